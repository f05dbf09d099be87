"""What a runtime counts about a served policy: `Counters`, mergeable with `+`.

A runtime that serves a policy counts, cheaply and mergeably: per ramp, how
many inputs reached it and which bin their signal fell in; where they stopped
and which ramp's prediction was output; and, on a random audit share of inputs
run to the final ramp, whether the served output agreed with the final ramp
(and, optionally, the audited rows themselves). `jexit.monitor.check` compares
the counts with the fit rows'; `Counters.save` and `Counters.load` write and
read the counters file (`jexit.counters_file`). docs/monitor.md is the user's
page.

Like `jexit.runtime`, this module needs only numpy and the standard library
(no JAX, scipy or torch), so a server may vendor it beside the runtime.

Consistency (checked on load and save): `stop_hist.sum() == output_hist.sum()
== num_inputs`; `occupancy[k].sum() + nan[k] == stop_hist[k:].sum()` (an input
reaches ramp k iff it stopped at k or later); the output ramp is never after
the stop ramp; `audit_agree <= audited <= num_inputs`; audited rows, when kept,
number `audited` and agree as `audit_agree` says.
"""

import hashlib
import json
import os
from typing import Optional

import numpy as np

from jexit import counters_file
from jexit.counters_file import (MAX_BINS, MAX_COUNT, MAX_ELEMENTS, MAX_RAMPS, _bad,
                                 _check_digest, _is_int)

_COUNT_KEYS = ("occupancy", "nan", "stop_hist", "output_hist")
_ROW_KEYS = ("audit_conf", "audit_pred", "audit_output")
_SCALAR_KEYS = ("policy_sha256", "num_inputs", "audited", "audit_agree")


def _describe(a):
  return f"shape {tuple(np.shape(a))} dtype {np.asarray(a).dtype}"


def _int_array(name, a, shape=None) -> np.ndarray:
  """`a` as int64 (integer-valued input only), or a ValueError naming `name`."""
  a = np.asarray(a)
  if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
    a = a.astype(np.int64)
  if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and a.size == 0):
    raise ValueError(f"{name}: expected integers, got {_describe(a)}")
  if shape is not None and a.shape != shape:
    raise ValueError(f"{name}: expected shape {shape}, got {_describe(a)}")
  if a.dtype.kind == "u" and a.size and a.max() > MAX_COUNT:
    raise ValueError(f"{name}: expected values below 2**63, got {int(a.max())}")
  return a.astype(np.int64)


def _float_array(name, a, shape) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind not in "biuf":
    raise ValueError(f"{name}: expected real numbers, got {_describe(a)}")
  if a.shape != shape:
    raise ValueError(f"{name}: expected shape {shape}, got {_describe(a)}")
  return a.astype(np.float64)


def policy_sha256(header: dict, arrays: dict) -> str:
  """sha256 hex digest identifying a policy: its header and its arrays.

  Hashes the header as canonical JSON (sorted keys) and, for each array in
  sorted name order, its name, dtype, shape and C-order bytes, so a table and
  the same table written and re-read hash alike. Counters carry it so that
  counts of different policies are never merged or checked against each other.

  Args:
    header: the policy file's JSON header (a dict).
    arrays: name -> array, e.g. `{"edges": ..., "loss": ..., "threshold": ...,
      "cost": ...}` (plus `"calibration"` for a "class" table).
  """
  if not isinstance(header, dict):
    raise ValueError(f"header: expected a dict, got {type(header).__name__}")
  if not isinstance(arrays, dict):
    raise ValueError(f"arrays: expected a dict of name -> array, got {type(arrays).__name__}")
  h = hashlib.sha256()
  h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    if a.dtype.hasobject:
      raise ValueError(f"arrays[{name!r}]: expected a plain array, got dtype {a.dtype}")
    h.update(f";{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


class _Rows:
  """An array attribute grown by appending row chunks, concatenated when read.

  A server records a few audited rows per batch; concatenating on every call
  would copy all earlier rows each time (quadratic in the rows kept).
  """

  def __set_name__(self, owner, name):
    self.name = name

  def __get__(self, obj, owner=None):
    if obj is None:
      return self
    chunks = obj._chunks[self.name]
    if chunks is not None and len(chunks) > 1:
      chunks[:] = [np.concatenate(chunks)]
    return None if chunks is None else chunks[0]

  def __set__(self, obj, value):
    obj._chunks[self.name] = None if value is None else [value]

  def append(self, obj, rows):
    obj._chunks[self.name].append(rows)


class Counters:
  """What a runtime counts about a served policy; mergeable with `+`.

  Counts are int64. Between batches the fields satisfy the consistency rules
  of the module docstring; a batch is counted by `update` at every ramp for
  the inputs that reached it, then `record_stops` once (or by `record_batch`
  for a whole replay). Audited inputs are counted as the policy served them
  (occupancy up to the policy's stop ramp), never as the audit ran them.

  Attributes:
    occupancy: `[K, S]` inputs that reached ramp k with their signal in bin s.
    nan: `[K]` inputs that reached ramp k with a NaN signal (a table loaded
      with `nan="continue"`); they have no bin.
    stop_hist: `[K]` inputs that stopped at ramp k.
    output_hist: `[K]` inputs whose output is ramp k's prediction.
    num_inputs: inputs served.
    audited: inputs audited (run to the final ramp whatever the policy said).
    audit_agree: audited inputs whose served output agreed with the final ramp.
    audit_conf, audit_pred: `[A, K]` the audited rows (A = audited), or None
      when rows are not kept. audit_output: `[A]` the ramp served for each.
    audit_signal: `[A, K]` the audited rows' custom signal, or None.
    policy_sha256: identity of the policy counted (`policy_sha256`), or None.

  Examples:
    >>> import numpy as np
    >>> c = Counters(2, 3)
    >>> c.update(0, np.array([0, 2, 2]))        # 3 inputs ran ramp 0
    >>> c.update(1, np.array([1]))              # 1 went on to ramp 1
    >>> c.record_stops(np.array([0, 1, 0]), np.array([0, 0, 0]))
    >>> c.occupancy.tolist(), c.stop_hist.tolist(), c.num_inputs
    ([[1, 0, 2], [0, 1, 0]], [2, 1], 3)
  """

  def __init__(self, num_ramps: int, num_bins: int, *, policy_sha256: Optional[str] = None,
               audit_rows: bool = True, audit_signal: bool = False):
    if not _is_int(num_ramps) or not 1 <= num_ramps <= MAX_RAMPS:
      raise ValueError(f"num_ramps: expected an integer in [1, {MAX_RAMPS}], got {num_ramps!r}")
    if not _is_int(num_bins) or not 1 <= num_bins <= MAX_BINS:
      raise ValueError(f"num_bins: expected an integer in [1, {MAX_BINS}], got {num_bins!r}")
    if num_ramps * num_bins > MAX_ELEMENTS:
      raise ValueError(f"num_ramps, num_bins: expected K * S <= {MAX_ELEMENTS}, got "
                       f"{num_ramps} * {num_bins}")
    _check_digest("policy_sha256", policy_sha256)
    for name, v in (("audit_rows", audit_rows), ("audit_signal", audit_signal)):
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name}: expected a bool, got {v!r}")
    if audit_signal and not audit_rows:
      raise ValueError("audit_signal: audited signals are kept only with audit_rows=True")
    k, s = int(num_ramps), int(num_bins)
    self._chunks = {}
    self.policy_sha256 = policy_sha256
    self.occupancy = np.zeros((k, s), np.int64)
    self.nan = np.zeros(k, np.int64)
    self.stop_hist = np.zeros(k, np.int64)
    self.output_hist = np.zeros(k, np.int64)
    self.num_inputs = 0
    self.audited = 0
    self.audit_agree = 0
    self.audit_conf = np.zeros((0, k), np.float64) if audit_rows else None
    self.audit_pred = np.zeros((0, k), np.int64) if audit_rows else None
    self.audit_output = np.zeros(0, np.int64) if audit_rows else None
    self.audit_signal = np.zeros((0, k), np.float64) if audit_signal else None

  audit_conf = _Rows()
  audit_pred = _Rows()
  audit_output = _Rows()
  audit_signal = _Rows()

  @property
  def num_ramps(self) -> int:
    return self.occupancy.shape[0]

  @property
  def num_bins(self) -> int:
    return self.occupancy.shape[1]

  @property
  def audit_rows(self) -> bool:
    """Whether audited rows are kept (checked without concatenating them)."""
    return self._chunks["audit_pred"] is not None

  @property
  def keeps_signal(self) -> bool:
    """Whether audited rows carry a custom signal."""
    return self._chunks["audit_signal"] is not None

  @property
  def reached(self) -> np.ndarray:
    """`[K]` inputs that reached ramp k (binned or NaN)."""
    return self.occupancy.sum(axis=1) + self.nan

  def __repr__(self):
    return (f"Counters(K={self.num_ramps}, S={self.num_bins}, num_inputs={self.num_inputs}, "
            f"audited={self.audited}, audit_agree={self.audit_agree}, "
            f"policy_sha256={self.policy_sha256!r})")

  # ----- counting (whole arrays, no per-input Python) -----

  def _bin_counts(self, name, bins) -> np.ndarray:
    """`[S]` counts of a 1-D bin array, or a ValueError for bins outside [0, S)."""
    s = self.num_bins
    if bins.dtype.kind not in "iu":
      if bins.size == 0:
        return np.zeros(s, np.int64)
      raise ValueError(f"{name}: expected integer bins, got {_describe(bins)}")
    try:
      counts = np.bincount(bins, minlength=s)
    except (TypeError, ValueError):  # a negative bin, or uint64 numpy will not cast
      raise ValueError(f"{name}: expected bins in [0, {s}), got {int(np.min(bins))}") from None
    if counts.shape[0] > s:
      raise ValueError(f"{name}: expected bins in [0, {s}), got {int(np.max(bins))}")
    return counts

  def update(self, k: int, bins, nan=None) -> None:
    """Counts the inputs that reached ramp k (0-based) by their bin.

    Args:
      k: the ramp that just ran.
      bins: `[B]` int bins in [0, S) of the inputs that ran ramp k (what
        `ExitTable.bins(k, signal)` returns).
      nan: optional `[B]` bool, inputs whose signal was NaN: counted in
        `nan[k]`, their bin ignored.
    """
    if not _is_int(k) or not 0 <= k < self.num_ramps:
      raise ValueError(f"k: expected a ramp in [0, {self.num_ramps}), got {k!r}")
    bins = np.asarray(bins).reshape(-1)
    if nan is not None:
      nan = np.asarray(nan, bool).reshape(-1)
      if nan.shape != bins.shape:
        raise ValueError(f"nan: expected shape {bins.shape} like bins, got {_describe(nan)}")
      if nan.any():
        counts = self._bin_counts("bins", bins[~nan])  # checked before anything is added
        self.nan[k] += int(nan.sum())
        self.occupancy[k] += counts
        return
    self.occupancy[k] += self._bin_counts("bins", bins)

  def record_stops(self, stop_ramp, output_ramp) -> None:
    """Counts where a batch of inputs stopped and which ramp each output.

    Args:
      stop_ramp: `[B]` int, 0-based ramp where each input stopped.
      output_ramp: `[B]` int, the ramp whose prediction it output (<= stop).
    """
    stop_ramp = np.asarray(stop_ramp).reshape(-1)
    output_ramp = np.asarray(output_ramp).reshape(-1)
    if output_ramp.shape != stop_ramp.shape:
      raise ValueError(f"output_ramp: expected shape {stop_ramp.shape} like stop_ramp, got "
                       f"{_describe(output_ramp)}")
    # Method calls rather than np.any/np.min: this runs once per served batch.
    stops = self._ramp_counts("stop_ramp", stop_ramp)
    outputs = self._ramp_counts("output_ramp", output_ramp)
    if (output_ramp > stop_ramp).any():
      raise ValueError(f"output_ramp: expected ramps in [0, stop_ramp], got "
                       f"{output_ramp[output_ramp > stop_ramp][:3].tolist()} after "
                       f"stop_ramp {stop_ramp[output_ramp > stop_ramp][:3].tolist()}")
    self.stop_hist += stops
    self.output_hist += outputs
    self.num_inputs += int(stop_ramp.shape[0])

  def _ramp_counts(self, name, ramps) -> np.ndarray:
    """`[K]` counts of a 1-D ramp array, or a ValueError for ramps outside [0, K)."""
    k = self.num_ramps
    if ramps.size == 0:
      return np.zeros(k, np.int64)
    try:
      counts = np.bincount(ramps, minlength=k)
    except (TypeError, ValueError):  # a negative or non-integer ramp
      bad = int(ramps.min()) if ramps.dtype.kind in "iu" else _describe(ramps)
      raise ValueError(f"{name}: expected integer ramps in [0, {k}), got {bad}") from None
    if counts.shape[0] > k:
      raise ValueError(f"{name}: expected integer ramps in [0, {k}), got {int(ramps.max())}")
    return counts

  def record_batch(self, bins, stop_ramp, output_ramp, nan=None) -> None:
    """Counts a whole replay: per-input bins at every ramp and the decisions.

    Only the ramps an input reached (`k <= stop_ramp`) are counted; the bins
    beyond are ignored (they may be anything, e.g. -1).

    Args:
      bins: `[N, K]` int bin of every input at every ramp.
      stop_ramp, output_ramp: `[N]` int, as for `record_stops`.
      nan: optional `[N, K]` bool, NaN signals (counted in `nan`).
    """
    k, s = self.num_ramps, self.num_bins
    bins = np.asarray(bins)
    stop_ramp = np.asarray(stop_ramp)
    if bins.ndim != 2 or bins.shape[1] != k:
      raise ValueError(f"bins: expected shape [N, K={k}], got {_describe(bins)}")
    if stop_ramp.shape != bins.shape[:1]:
      raise ValueError(f"stop_ramp: expected shape [N] = {bins.shape[:1]} like bins, got "
                       f"{_describe(stop_ramp)}")
    if bins.dtype.kind not in "iu":
      raise ValueError(f"bins: expected integer bins, got {_describe(bins)}")
    if stop_ramp.size and (stop_ramp.min() < 0 or stop_ramp.max() >= k):
      raise ValueError(f"stop_ramp: expected ramps in [0, {k}), got "
                       f"{stop_ramp[(stop_ramp < 0) | (stop_ramp >= k)][:3].tolist()}")
    reached = np.arange(k)[None, :] <= stop_ramp[:, None]
    if nan is not None:
      nan = np.asarray(nan, bool)
      if nan.shape != bins.shape:
        raise ValueError(f"nan: expected shape {bins.shape} like bins, got {_describe(nan)}")
      nan = nan & reached
      reached = reached & ~nan
    used = bins[reached]
    if used.size and (used.min() < 0 or used.max() >= s):
      raise ValueError(f"bins: expected bins in [0, {s}) at the ramps inputs reached, got "
                       f"{used[(used < 0) | (used >= s)][:3].tolist()}")
    flat = (np.arange(k)[None, :] * s + bins)[reached]
    occupancy = np.bincount(flat, minlength=k * s).reshape(k, s)
    self.record_stops(stop_ramp, output_ramp)  # checks output_ramp before anything is added
    self.occupancy += occupancy
    if nan is not None:
      self.nan += nan.sum(axis=0)

  def record_audit(self, pred, output_ramp, *, conf=None, signal=None) -> None:
    """Counts audited inputs: rows run to the final ramp, served as the policy said.

    Args:
      pred: `[B, K]` int predictions of every ramp of the audited inputs.
      output_ramp: `[B]` int, the ramp whose prediction was served; the input
        agrees when `pred[b, output_ramp[b]] == pred[b, K-1]`.
      conf: `[B, K]` max-softmax confidences; required when rows are kept.
      signal: `[B, K]` the custom signal; required iff the counters keep
        audited signals (`audit_signal=True`).
    """
    k = self.num_ramps
    pred = _int_array("pred", pred)
    if pred.ndim != 2 or pred.shape[1] != k:
      raise ValueError(f"pred: expected shape [B, K={k}], got {_describe(pred)}")
    b = pred.shape[0]
    output_ramp = _int_array("output_ramp", output_ramp, (b,))
    if b and (output_ramp.min() < 0 or output_ramp.max() >= k):
      raise ValueError(f"output_ramp: expected ramps in [0, {k}), got "
                       f"{output_ramp[(output_ramp < 0) | (output_ramp >= k)][:3].tolist()}")
    rows = {}
    if self.audit_rows:
      if conf is None:
        raise ValueError("conf: these counters keep audited rows (audit_rows=True); pass "
                         "conf=[B, K]")
      rows["audit_conf"] = _float_array("conf", conf, (b, k))
      if self.keeps_signal:
        if signal is None:
          raise ValueError("signal: these counters keep audited signals "
                           "(audit_signal=True); pass signal=[B, K]")
        rows["audit_signal"] = _float_array("signal", signal, (b, k))
      elif signal is not None:
        raise ValueError("signal: these counters keep no audited signal (audit_signal=False)")
    agree = pred[np.arange(b), output_ramp] == pred[:, -1]
    self.audited += b
    self.audit_agree += int(agree.sum())
    if self.audit_rows:
      rows["audit_pred"] = pred
      rows["audit_output"] = output_ramp
      for name, a in rows.items():
        getattr(Counters, name).append(self, a)

  # ----- merging, checking -----

  def copy(self) -> "Counters":
    out = Counters.__new__(Counters)
    out._chunks = {}
    for name in _SCALAR_KEYS:
      setattr(out, name, getattr(self, name))
    for name in _COUNT_KEYS + _ROW_KEYS + ("audit_signal",):
      v = getattr(self, name)
      setattr(out, name, None if v is None else v.copy())
    return out

  def _same_kind(self, other, what):
    if not isinstance(other, Counters):
      raise ValueError(f"{what}: expected Counters, got {type(other).__name__}")
    if other.occupancy.shape != self.occupancy.shape:
      raise ValueError(f"{what}: counters of shape [K, S] = {self.occupancy.shape} and "
                       f"{other.occupancy.shape} count different tables")
    if other.policy_sha256 != self.policy_sha256:
      raise ValueError(f"{what}: counters of policy {self.policy_sha256!r} and of policy "
                       f"{other.policy_sha256!r} count different policies")
    if (other.audit_rows, other.keeps_signal) != (self.audit_rows, self.keeps_signal):
      raise ValueError(f"{what}: one counters keeps audited rows (or signals) and the "
                       f"other does not; the merged rows would not cover every audit")

  def __add__(self, other) -> "Counters":
    """The counts of both streams: sums, audited rows concatenated (self's first)."""
    if isinstance(other, int) and not isinstance(other, bool) and other == 0:
      return self.copy()  # sum([a, b, ...]) starts from 0
    if not isinstance(other, Counters):
      return NotImplemented
    self._same_kind(other, "other")
    out = self.copy()
    for name in _COUNT_KEYS:
      setattr(out, name, getattr(self, name) + getattr(other, name))
    for name in ("num_inputs", "audited", "audit_agree"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    for name in _ROW_KEYS + ("audit_signal",):
      if getattr(self, name) is not None:
        setattr(out, name, np.concatenate([getattr(self, name), getattr(other, name)]))
    return out

  __radd__ = __add__

  def __eq__(self, other):
    if not isinstance(other, Counters):
      return NotImplemented
    same = lambda a, b: (a is None and b is None) or (
        a is not None and b is not None and a.dtype == b.dtype and np.array_equal(a, b))
    return (all(getattr(self, name) == getattr(other, name) for name in _SCALAR_KEYS)
            and all(same(getattr(self, name), getattr(other, name))
                    for name in _COUNT_KEYS + _ROW_KEYS + ("audit_signal",)))

  __hash__ = None

  def validate(self, path: str = "<memory>") -> "Counters":
    """Checks the consistency rules (module docstring); returns self.

    Raises:
      ValueError: naming the first field that breaks a rule.
    """
    bad = lambda what: _bad(path, what)
    k, s = self.occupancy.shape
    for name in _COUNT_KEYS:
      a = getattr(self, name)
      if np.any(a < 0):
        bad(f"{name}: expected counts >= 0, got {a[a < 0][:3].tolist()}")
    for name in ("num_inputs", "audited", "audit_agree"):
      v = getattr(self, name)
      if not _is_int(v) or not 0 <= v <= MAX_COUNT:
        bad(f"{name}: expected an integer count >= 0, got {v!r}")
    n = self.num_inputs
    if int(self.stop_hist.sum()) != n:
      bad(f"stop_hist: expected counts summing to num_inputs = {n}, got "
          f"{self.stop_hist.tolist()} (sum {int(self.stop_hist.sum())})")
    if int(self.output_hist.sum()) != n:
      bad(f"output_hist: expected counts summing to num_inputs = {n}, got "
          f"{self.output_hist.tolist()} (sum {int(self.output_hist.sum())})")
    # An input reaches ramp k iff it stopped at k or later.
    expected = np.cumsum(self.stop_hist[::-1])[::-1]
    reached = self.reached
    if not np.array_equal(reached, expected):
      r = int(np.flatnonzero(reached != expected)[0])
      bad(f"occupancy: expected occupancy[{r}].sum() + nan[{r}] = inputs that stopped at "
          f"ramp {r} or later = {int(expected[r])}, got {int(reached[r])}")
    # The output ramp is never after the stop ramp: as many outputs at ramps
    # >= k as stops there, at most.
    late_out = np.cumsum(self.output_hist[::-1])[::-1]
    if np.any(late_out > expected):
      r = int(np.flatnonzero(late_out > expected)[0])
      bad(f"output_hist: expected at most {int(expected[r])} outputs at ramps >= {r} "
          f"(inputs that stopped there), got {int(late_out[r])}")
    if self.audited > n:
      bad(f"audited: expected at most num_inputs = {n}, got {self.audited}")
    if self.audit_agree > self.audited:
      bad(f"audit_agree: expected at most audited = {self.audited}, got {self.audit_agree}")
    if self.audit_rows:
      a = self.audited
      for name, shape in (("audit_conf", (a, k)), ("audit_pred", (a, k)), ("audit_output", (a,)),
                          ("audit_signal", (a, k))):
        v = getattr(self, name)
        if v is not None and v.shape != shape:
          bad(f"{name}: expected shape {shape} (audited = {a} rows), got {_describe(v)}")
      if a and (self.audit_output.min() < 0 or self.audit_output.max() >= k):
        bad(f"audit_output: expected ramps in [0, {k}), got "
            f"{self.audit_output[(self.audit_output < 0) | (self.audit_output >= k)][:3].tolist()}")
      agree = int(np.sum(self.audit_pred[np.arange(a), self.audit_output]
                         == self.audit_pred[:, -1]))
      if agree != self.audit_agree:
        bad(f"audit_agree: expected {agree} (the audited rows that agree), got "
            f"{self.audit_agree}")
    elif self.keeps_signal:
      bad("audit_signal: audited signals without audited rows")
    return self

  def audit_trace(self, cost=None) -> dict:
    """The audited rows as the fields of a `jexit.Traces` (no labels).

    Rows with a non-finite confidence or signal (NaN signals served with
    `nan="continue"`) are left out: a trace holds finite values only.

    Returns:
      `{"conf": [A, K], "pred": [A, K], "label": None, "cost": [K] or None,
      "signal": [A, K] or None}`: `jexit.Traces(**d)` with a cost is a trace
      to refit on.
    """
    if not self.audit_rows:
      raise ValueError("audit_trace: these counters keep no audited rows (audit_rows=False)")
    if cost is not None:
      cost = _float_array("cost", cost, (self.num_ramps,))
    keep = np.isfinite(self.audit_conf).all(axis=1)
    if self.audit_signal is not None:
      keep &= np.isfinite(self.audit_signal).all(axis=1)
    return {"conf": self.audit_conf[keep], "pred": self.audit_pred[keep], "label": None,
            "cost": cost, "signal": None if self.audit_signal is None
            else self.audit_signal[keep]}

  # ----- file -----

  def save(self, path) -> None:
    """Writes the counters file (`jexit.counters_file`); atomically replaces `path`.

    Raises:
      ValueError: if the counts are inconsistent (e.g. saved in the middle of
        a batch, between `update` and `record_stops`).
    """
    path = os.fspath(path)
    self.validate(path)
    header = {"num_ramps": self.num_ramps, "num_bins": self.num_bins,
              "policy_sha256": self.policy_sha256, "num_inputs": int(self.num_inputs),
              "audited": int(self.audited), "audit_agree": int(self.audit_agree),
              "audit_rows": self.audit_rows, "audit_signal": self.keeps_signal}
    arrays = {name: getattr(self, name) for name in _COUNT_KEYS}
    if self.audit_rows:
      arrays.update({name: getattr(self, name) for name in _ROW_KEYS})
    if self.audit_signal is not None:
      arrays["audit_signal"] = self.audit_signal
    counters_file.write(path, header, arrays)

  @classmethod
  def load(cls, path) -> "Counters":
    """Reads and validates a counters file (no pickle, bounded allocation).

    Raises:
      ValueError: naming the field, for an unreadable, corrupt, inconsistent or
        oversized file, a missing or unknown key, or an unknown version.
    """
    header, arrays = counters_file.read(path)
    out = cls(header["num_ramps"], header["num_bins"], policy_sha256=header["policy_sha256"],
              audit_rows=header["audit_rows"], audit_signal=header["audit_signal"])
    for key, v in arrays.items():
      setattr(out, key, v)
    out.num_inputs, out.audited, out.audit_agree = (
        header["num_inputs"], header["audited"], header["audit_agree"])
    return out.validate(os.fspath(path))
