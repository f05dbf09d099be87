"""Watching a deployed exit policy: counters, drift tests, the audited loss.

A runtime that serves a policy counts, cheaply and mergeably (`Counters`):
per ramp, how many inputs reached it and which bin their signal fell in; where
they stopped and which ramp's prediction was output; and, on a random audit
share of inputs run to the final ramp, whether the served output agreed with
the final ramp. `check` compares those counts with the fit rows' counts (a
`Reference`, stored with the policy) and returns a `Report`: ok, drift (which
ramps, how much), or budget exceeded. docs/monitor.md is the user's page.

Like `jexit.runtime`, this module needs only numpy and the standard library
(no JAX, scipy or torch, no other jexit module), so a server may vendor it
beside the runtime. The few special functions it needs (chi-square and binomial
tails, the beta quantile) are implemented here and tested against scipy.

Counters file (format `jexit-counters`, version 1): a `.npz` of plain arrays,
read with `allow_pickle=False` after every member's `.npy` header was checked
(dtype and shape) against the JSON header, so a hostile file cannot make the
reader allocate more than the header's bounded sizes:

| key            | shape    | dtype   | meaning |
|----------------|----------|---------|---------|
| `header`       | `[]`     | unicode | JSON object, see `HEADER_FIELDS` |
| `occupancy`    | `[K, S]` | int64   | inputs that reached ramp k with their signal in bin s |
| `nan`          | `[K]`    | int64   | inputs that reached ramp k with a NaN signal (no bin) |
| `stop_hist`    | `[K]`    | int64   | inputs that stopped at ramp k |
| `output_hist`  | `[K]`    | int64   | inputs whose output is ramp k's prediction |
| `audit_conf`   | `[A, K]` | float64 | audited rows' max softmax (iff header.audit_rows) |
| `audit_pred`   | `[A, K]` | int64   | audited rows' predictions (iff header.audit_rows) |
| `audit_output` | `[A]`    | int64   | the ramp the policy served for each audited row |
| `audit_signal` | `[A, K]` | float64 | audited rows' custom signal (iff header.audit_signal) |

Consistency (checked on load and save): `stop_hist.sum() == output_hist.sum()
== num_inputs`; `occupancy[k].sum() + nan[k] == stop_hist[k:].sum()` (an input
reaches ramp k iff it stopped at k or later); the output ramp is never after
the stop ramp; `audit_agree <= audited <= num_inputs`; audited rows, when kept,
number `audited` and agree as `audit_agree` says.
"""

import hashlib
import json
import math
import os
import re
import zipfile
import zlib
from typing import NamedTuple, Optional, Tuple

import numpy as np

FORMAT_NAME = "jexit-counters"
FORMAT_VERSION = 1
MAX_RAMPS = 4096
MAX_BINS = 1 << 20
MAX_ELEMENTS = 1 << 27  # per array member: 1 GiB of float64
MAX_HEADER_CHARS = 1 << 16
MAX_COUNT = (1 << 63) - 1
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_EFFECT = 0.05
VERDICTS = ("ok", "drift", "budget exceeded")
# name -> (required, accepted Python types, meaning)
HEADER_FIELDS = {
    "format": (True, (str,), f"always {FORMAT_NAME!r}"),
    "format_version": (True, (int,), "integer version of this layout"),
    "num_ramps": (True, (int,), "K"),
    "num_bins": (True, (int,), "S"),
    "policy_sha256": (True, (str, type(None)), "`policy_sha256` of the policy counted, or null"),
    "num_inputs": (True, (int,), "inputs served"),
    "audited": (True, (int,), "inputs audited (run to the final ramp)"),
    "audit_agree": (True, (int,), "audited inputs whose served output agreed with the final ramp"),
    "audit_rows": (True, (bool,), "whether the audited rows are kept (audit_* arrays)"),
    "audit_signal": (True, (bool,), "whether the audited rows carry a custom signal"),
}
_COUNT_KEYS = ("occupancy", "nan", "stop_hist", "output_hist")
_ROW_KEYS = ("audit_conf", "audit_pred", "audit_output")
_SCALAR_KEYS = ("policy_sha256", "num_inputs", "audited", "audit_agree")


def _describe(a):
  return f"shape {tuple(np.shape(a))} dtype {np.asarray(a).dtype}"


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


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

  def reference(self, *, max_loss=None, certificate=None) -> "Reference":
    """These counts as a `Reference` (e.g. the fit rows replayed with counters on)."""
    self.validate()
    if self.nan.any():
      raise ValueError(f"counters.nan: a reference has a bin for every input, got NaN "
                       f"signals at ramps {np.flatnonzero(self.nan).tolist()}")
    return check_reference(Reference(self.occupancy.copy(), self.stop_hist.copy(),
                                     self.num_inputs, max_loss, certificate), "counters")

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
    """Writes the counters file (module docstring); atomically replaces `path`.

    Raises:
      ValueError: if the counts are inconsistent (e.g. saved in the middle of
        a batch, between `update` and `record_stops`).
    """
    path = os.fspath(path)
    self.validate(path)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "num_ramps": self.num_ramps, "num_bins": self.num_bins,
              "policy_sha256": self.policy_sha256, "num_inputs": int(self.num_inputs),
              "audited": int(self.audited), "audit_agree": int(self.audit_agree),
              "audit_rows": self.audit_rows, "audit_signal": self.keeps_signal}
    arrays = {name: getattr(self, name) for name in _COUNT_KEYS}
    if self.audit_rows:
      arrays.update({name: getattr(self, name) for name in _ROW_KEYS})
    if self.audit_signal is not None:
      arrays["audit_signal"] = self.audit_signal
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to the name
        np.savez_compressed(f, header=np.array(json.dumps(header, sort_keys=True)), **arrays)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path) -> "Counters":
    """Reads and validates a counters file (no pickle, bounded allocation).

    Raises:
      ValueError: naming the field, for an unreadable, corrupt, inconsistent or
        oversized file, a missing or unknown key, or an unknown version.
    """
    path = os.fspath(path)
    try:
      archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
      _bad(path, f"could not read it as a .npz (zip) archive ({type(e).__name__}: {e})")
    with archive:
      names = archive.namelist()
      if len(set(names)) != len(names):
        _bad(path, f"duplicate members in the archive: {sorted(names)}")
      if not all(name.endswith(".npy") for name in names):
        _bad(path, f"expected only .npy members, got {sorted(names)}")
      keys = {name[:-4] for name in names}
      if "header" not in keys:
        _bad(path, f"missing key 'header' (not a jexit counters file?); keys: {sorted(keys)}")
      raw = _read_member(archive, path, "header", None, "U", MAX_HEADER_CHARS)
      try:
        header = json.loads(str(raw))
      except (json.JSONDecodeError, RecursionError) as e:
        _bad(path, f"header: not valid JSON ({type(e).__name__}: {e})")
      header = _check_header(header, path)
      k, s, a = header["num_ramps"], header["num_bins"], header["audited"]
      shapes = {"occupancy": (k, s), "nan": (k,), "stop_hist": (k,), "output_hist": (k,)}
      if header["audit_rows"]:
        shapes.update(audit_conf=(a, k), audit_pred=(a, k), audit_output=(a,))
      if header["audit_signal"]:
        shapes["audit_signal"] = (a, k)
      unknown = sorted(keys - set(shapes) - {"header"})
      missing = [key for key in shapes if key not in keys]
      if unknown:
        _bad(path, f"unknown key(s) {unknown}; expected {['header'] + list(shapes)}")
      if missing:
        _bad(path, f"missing key(s) {missing}; expected {['header'] + list(shapes)}")
      arrays = {}
      for key, shape in shapes.items():
        kinds = "f" if key in ("audit_conf", "audit_signal") else "iu"
        arrays[key] = _read_member(archive, path, key, shape, kinds, MAX_ELEMENTS)
    out = cls(k, s, policy_sha256=header["policy_sha256"], audit_rows=header["audit_rows"],
              audit_signal=header["audit_signal"])
    for key, v in arrays.items():
      if v.dtype.kind == "u" and v.size and v.max() > MAX_COUNT:
        _bad(path, f"{key}: expected values below 2**63, got {int(v.max())}")
      setattr(out, key, v.astype(np.float64 if v.dtype.kind == "f" else np.int64))
    out.num_inputs, out.audited, out.audit_agree = (
        header["num_inputs"], header["audited"], header["audit_agree"])
    return out.validate(path)


def _bad(path, what):
  raise ValueError(f"counters file {path}: {what}")


def _check_digest(name, digest):
  if digest is not None and not (isinstance(digest, str)
                                 and re.fullmatch(r"[0-9a-f]{64}", digest)):
    raise ValueError(f"{name}: expected 64 lowercase hex digits or None, got {digest!r}")


def _check_header(header, path) -> dict:
  """Validates a counters header (a dict parsed from JSON); returns it."""
  if not isinstance(header, dict):
    _bad(path, f"header: expected a JSON object, got {type(header).__name__}")
  if header.get("format") != FORMAT_NAME:
    _bad(path, f"header.format: expected {FORMAT_NAME!r}, got {header.get('format')!r} "
               f"(not a jexit counters file?)")
  version = header.get("format_version")
  if not _is_int(version):
    _bad(path, f"header.format_version: expected an integer, got {version!r}")
  if version != FORMAT_VERSION:
    _bad(path, f"header.format_version: this jexit reads format version {FORMAT_VERSION}, "
               f"the file has version {version}"
               + ("; upgrade jexit to read it" if version > FORMAT_VERSION else ""))
  unknown = sorted(set(header) - set(HEADER_FIELDS))
  if unknown:
    _bad(path, f"header: unknown field(s) {unknown} for format version {FORMAT_VERSION}")
  for name, (required, types, meaning) in HEADER_FIELDS.items():
    if name not in header:
      _bad(path, f"header.{name}: missing ({meaning})")
    value = header[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
      _bad(path, f"header.{name}: expected {' or '.join(t.__name__ for t in types)} "
                 f"({meaning}), got {value!r}")
  for name, lo, hi in (("num_ramps", 1, MAX_RAMPS), ("num_bins", 1, MAX_BINS),
                       ("num_inputs", 0, MAX_COUNT), ("audited", 0, MAX_COUNT),
                       ("audit_agree", 0, MAX_COUNT)):
    if not lo <= header[name] <= hi:
      _bad(path, f"header.{name}: expected an integer in [{lo}, {hi}], got {header[name]}")
  k, s = header["num_ramps"], header["num_bins"]
  if k * s > MAX_ELEMENTS:
    _bad(path, f"header.num_ramps, num_bins: expected K * S <= {MAX_ELEMENTS}, got {k} * {s}")
  if header["audit_rows"] and header["audited"] * k > MAX_ELEMENTS:
    _bad(path, f"header.audited: {header['audited']} audited rows of K = {k} ramps exceed "
               f"{MAX_ELEMENTS} values per array; save fewer rows per file")
  if header["audit_signal"] and not header["audit_rows"]:
    _bad(path, "header.audit_signal: true without audit_rows")
  try:
    _check_digest("policy_sha256", header["policy_sha256"])
  except ValueError as e:
    _bad(path, f"header.{e}")
  return header


def _read_member(archive, path, key, shape, kinds, max_elements) -> np.ndarray:
  """Reads member `key` after checking its `.npy` header: dtype kind in
  `kinds`, `shape` (None: 0-d), and at most `max_elements` values (for a
  unicode scalar: characters). Nothing is allocated before the checks pass."""
  try:
    with archive.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        found, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version in ((2, 0), (3, 0)):
        found, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        _bad(path, f"{key}: unknown .npy format version {version}")
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, RuntimeError) as e:
    if isinstance(e, ValueError) and str(e).startswith("counters file"):
      raise
    _bad(path, f"{key}: not a readable .npy member ({type(e).__name__}: {e})")
  if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
    want = {"U": "unicode text", "f": "floating-point values", "iu": "integers"}[kinds]
    _bad(path, f"{key}: expected {want}, got dtype {dtype}")
  count = math.prod(found) if found else 1
  if shape is None:
    if found != ():
      _bad(path, f"{key}: expected a 0-d array, got shape {found}")
    count = dtype.itemsize // 4  # unicode characters
  elif tuple(found) != tuple(shape):
    _bad(path, f"{key}: expected shape {tuple(shape)} (from the header), got shape {found}")
  if count > max_elements:
    _bad(path, f"{key}: {count} values exceed the limit of {max_elements}")
  try:
    with archive.open(key + ".npy") as f:
      return np.lib.format.read_array(f, allow_pickle=False)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, RuntimeError) as e:
    _bad(path, f"{key}: corrupt data ({type(e).__name__}: {e})")


# ----- the reference: the fit rows' counts, stored with the policy -----

class Reference(NamedTuple):
  """What the policy did on its fit rows: what live counts are compared with.

  Attributes:
    occupancy: `[K, S]` int, fit rows that reached ramp k with their signal
      in bin s (the policy replayed on them).
    stop_hist: `[K]` int, fit rows that stopped at ramp k.
    num_inputs: the number of fit rows.
    max_loss: the loss budget eps the policy was chosen for (rate of outputs
      that disagree with the final ramp), or None.
    certificate: JSON-ready dict describing a certified choice (eps, delta,
      n, ...), or None; passed through to the report.
  """
  occupancy: np.ndarray  # [K, S]
  stop_hist: np.ndarray  # [K]
  num_inputs: int
  max_loss: Optional[float] = None
  certificate: Optional[dict] = None

  def to_dict(self) -> dict:
    """JSON-ready (e.g. for a policy file's header); `reference_from_dict` reads it."""
    return {"occupancy": self.occupancy.tolist(), "stop_hist": self.stop_hist.tolist(),
            "num_inputs": int(self.num_inputs), "max_loss": self.max_loss,
            "certificate": self.certificate}


def check_reference(reference, name: str = "reference") -> Reference:
  """Validates a `Reference`; returns it with int64 arrays and a float max_loss.

  Raises:
    ValueError: naming the field: shapes, negative counts, sums that do not
      add up (as for `Counters`), max_loss outside [0, 1], a certificate that
      is not a JSON-ready dict.
  """
  if not isinstance(reference, Reference):
    raise ValueError(f"{name}: expected jexit.monitor.Reference, got "
                     f"{type(reference).__name__}")
  occupancy = _int_array(f"{name}.occupancy", reference.occupancy)
  if occupancy.ndim != 2 or not occupancy.shape[0] >= 1 or not occupancy.shape[1] >= 1:
    raise ValueError(f"{name}.occupancy: expected shape [K, S], got {_describe(occupancy)}")
  k = occupancy.shape[0]
  stop_hist = _int_array(f"{name}.stop_hist", reference.stop_hist, (k,))
  for field, a in (("occupancy", occupancy), ("stop_hist", stop_hist)):
    if np.any(a < 0):
      raise ValueError(f"{name}.{field}: expected counts >= 0, got {a[a < 0][:3].tolist()}")
  n = reference.num_inputs
  if not _is_int(n) or n < 1:
    raise ValueError(f"{name}.num_inputs: expected an integer >= 1, got {n!r}")
  if int(stop_hist.sum()) != n:
    raise ValueError(f"{name}.stop_hist: expected counts summing to num_inputs = {n}, got "
                     f"{stop_hist.tolist()}")
  expected = np.cumsum(stop_hist[::-1])[::-1]
  reached = occupancy.sum(axis=1)
  if not np.array_equal(reached, expected):
    r = int(np.flatnonzero(reached != expected)[0])
    raise ValueError(f"{name}.occupancy: expected row {r} to sum to the inputs that "
                     f"stopped at ramp {r} or later = {int(expected[r])}, got "
                     f"{int(reached[r])}")
  max_loss = reference.max_loss
  if max_loss is not None:
    if not (isinstance(max_loss, (int, float, np.integer, np.floating))
            and not isinstance(max_loss, (bool, np.bool_)) and 0 <= max_loss <= 1):
      raise ValueError(f"{name}.max_loss: expected a rate in [0, 1] or None, got {max_loss!r}")
    max_loss = float(max_loss)
  certificate = reference.certificate
  if certificate is not None:
    if not isinstance(certificate, dict):
      raise ValueError(f"{name}.certificate: expected a dict or None, got "
                       f"{type(certificate).__name__}")
    try:
      json.dumps(certificate, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}.certificate: expected a JSON-ready dict ({e})") from None
  return Reference(occupancy, stop_hist, int(n), max_loss, certificate)


def make_reference(bins, stop_ramp, num_bins: int, *, max_loss=None,
                   certificate=None) -> Reference:
  """The `Reference` of the fit rows, from the policy replayed on them.

  Args:
    bins: `[N, K]` int bin of every fit row at every ramp (e.g. the table's
      `bins(k, signal[:, k])` per ramp, or `jexit.Binning.assign`).
    stop_ramp: `[N]` int, the ramp where the policy stopped each row (e.g.
      `ExitTable.run(...)[0]`, or `evaluate(..., return_per_input=True)`).
    num_bins: S.
    max_loss: the budget eps, or None. certificate: a JSON-ready dict or None.

  Examples:
    >>> import numpy as np
    >>> ref = make_reference(np.array([[0, 1], [2, 2], [1, 0]]), np.array([1, 0, 1]), 3)
    >>> ref.occupancy.tolist(), ref.stop_hist.tolist(), ref.num_inputs
    ([[1, 1, 1], [1, 1, 0]], [1, 2], 3)
  """
  bins = np.asarray(bins)
  if bins.ndim != 2:
    raise ValueError(f"bins: expected shape [N, K], got {_describe(bins)}")
  stop_ramp = np.asarray(stop_ramp)
  counters = Counters(bins.shape[1], num_bins, audit_rows=False)
  counters.record_batch(bins, stop_ramp, np.zeros_like(stop_ramp))
  return counters.reference(max_loss=max_loss, certificate=certificate)


def reference_from_dict(d, name: str = "reference") -> Reference:
  """Reads `Reference.to_dict()`'s output (e.g. parsed from JSON), validated."""
  if not isinstance(d, dict):
    raise ValueError(f"{name}: expected a dict, got {type(d).__name__}")
  fields = set(Reference._fields)
  if set(d) != fields:
    raise ValueError(f"{name}: expected keys {sorted(fields)}, got {sorted(d)}")
  arrays = {}
  for key in ("occupancy", "stop_hist"):
    try:
      arrays[key] = np.asarray(d[key])
    except ValueError as e:  # ragged lists
      raise ValueError(f"{name}.{key}: expected a rectangular array ({e})") from None
    if arrays[key].size > MAX_ELEMENTS:
      raise ValueError(f"{name}.{key}: {arrays[key].size} values exceed {MAX_ELEMENTS}")
  return check_reference(Reference(arrays["occupancy"], arrays["stop_hist"], d["num_inputs"],
                                   d["max_loss"], d["certificate"]), name)


# ----- special functions (scipy is not a runtime dependency) -----

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 100_000


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


# ----- the tests -----

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


class DriftTest(NamedTuple):
  """One drift test: live counts against the reference's (`g_test`).

  Attributes:
    statistic: G. df: degrees of freedom. p_value: `Pr(chi2_df >= G)`.
    p_adjusted: Holm-adjusted over the family (every ramp and the stops).
    effect: total variation distance of the live and reference proportions.
    live, reference: the inputs each side counted.
    drift: `p_adjusted <= alpha and effect >= min_effect`.
  """
  statistic: float
  df: int
  p_value: float
  p_adjusted: float
  effect: float
  live: int
  reference: int
  drift: bool


class LossBound(NamedTuple):
  """The audited loss against the budget.

  Attributes:
    max_loss: the budget eps. audited: audited inputs. disagree: audited
      inputs whose served output disagreed with the final ramp.
    rate: `disagree / audited` (None when nothing was audited).
    lower, upper: one-sided Clopper-Pearson bounds at level alpha on the live
      disagreement rate.
    p_value: `Pr(Bin(audited, eps) >= disagree)`, the p-value of "live loss
      <= eps".
    exceeded: `lower > eps` (equivalently `p_value < alpha`): evidence that
      the live loss is above the budget.
  """
  max_loss: float
  audited: int
  disagree: int
  rate: Optional[float]
  lower: float
  upper: float
  p_value: float
  exceeded: bool


class Report(NamedTuple):
  """What `check` found.

  Attributes:
    verdict: "ok", "drift" or "budget exceeded" (takes precedence over drift;
      `drifted` still lists the drifted ramps).
    ramps: `[K]` DriftTest per ramp (bin occupancy of the inputs that reached it).
    stops: DriftTest of the stop histogram.
    budget: LossBound, or None when no budget was given.
    drifted: 0-based ramps whose occupancy test found drift.
    alpha, min_effect: the settings used.
    num_inputs, reference_inputs: live inputs and fit rows.
    certificate: the reference's certificate dict, or None.
  """
  verdict: str
  ramps: Tuple[DriftTest, ...]
  stops: DriftTest
  budget: Optional[LossBound]
  drifted: Tuple[int, ...]
  alpha: float
  min_effect: float
  num_inputs: int
  reference_inputs: int
  certificate: Optional[dict] = None

  @property
  def exit_code(self) -> int:
    """0 for "ok", 1 for "drift" or "budget exceeded" (`jexit monitor`)."""
    return 0 if self.verdict == "ok" else 1

  def to_dict(self) -> dict:
    """JSON-ready (plain Python types; no NaN or inf)."""
    return {"verdict": self.verdict, "exit_code": self.exit_code,
            "drifted": list(self.drifted), "alpha": self.alpha,
            "min_effect": self.min_effect, "num_inputs": self.num_inputs,
            "reference_inputs": self.reference_inputs,
            "ramps": [t._asdict() for t in self.ramps], "stops": self.stops._asdict(),
            "budget": None if self.budget is None else self.budget._asdict(),
            "certificate": self.certificate}


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


def _drift_test(ref, live, simulations: int = SIMULATIONS) -> DriftTest:
  """The unadjusted test; `check` fills in p_adjusted and drift."""
  g, df, p = g_test_pvalue(ref, live, simulations=simulations)
  effect = total_variation(ref, live)
  return DriftTest(statistic=g, df=df, p_value=p, p_adjusted=p, effect=effect,
                   live=int(np.sum(live)), reference=int(np.sum(ref)), drift=False)


def _check_rate(name, v, lo_open, hi_open):
  if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
      or not ((0 < v if lo_open else 0 <= v) and (v < 1 if hi_open else v <= 1))):
    raise ValueError(f"{name}: expected a value in {'(' if lo_open else '['}0, "
                     f"1{')' if hi_open else ']'}, got {v!r}")
  return float(v)


def check(reference: Reference, counters: Counters, *, alpha: float = DEFAULT_ALPHA,
          min_effect: float = DEFAULT_MIN_EFFECT, max_loss: Optional[float] = None,
          policy_sha256: Optional[str] = None) -> Report:
  """Tests live counts against the reference: drift per ramp, stops, the budget.

  Drift: per ramp k, a two-sample G-test (`g_test`) of the bin occupancy of
  the live inputs that reached ramp k against the fit rows that did (plus a
  NaN category when live signals were NaN), and the same test of the stop
  histogram; chi-square p-values (simulated exact conditional p-values
  where a cell expects fewer than 5 counts, `g_test_pvalue`), Holm-adjusted
  over these K + 1 tests. A
  test finds drift when its adjusted p-value is <= alpha AND its effect size
  (total variation distance) is >= min_effect, so a long stream does not
  alarm on a shift too small to matter. Under the null (live inputs drawn
  i.i.d. from the fit rows' law) a "drift" verdict has probability <= alpha,
  up to the chi-square approximation where every cell expects 5 or more.

  Budget: with eps = max_loss (else `reference.max_loss`; no test when both
  are None), the audited disagreement d of a audited inputs gives one-sided
  Clopper-Pearson bounds at level alpha; "budget exceeded" only when the
  LOWER bound exceeds eps (evidence of excess, false alarm <= alpha when the
  live loss is within budget). The upper bound is reported: above eps it says
  the audit cannot yet vouch for the budget, which is no alarm.

  Args:
    reference: the fit rows' `Reference` (`make_reference`).
    counters: the live `Counters` (same K and S).
    alpha: level of each family (drift; budget), in (0, 1).
    min_effect: smallest total variation distance that counts as drift, in
      [0, 1]; 0 alarms on any significant shift.
    max_loss: the budget eps in [0, 1]; overrides `reference.max_loss`.
    policy_sha256: the identity of the policy the reference belongs to; when
      given, counters of another policy are refused.

  Returns:
    A `Report`; `report.exit_code` is 0 for "ok", else 1.

  Examples:
    >>> import numpy as np
    >>> ref = make_reference(np.array([[0, 1], [1, 0], [1, 1], [0, 0]] * 50),
    ...                      np.array([1, 0, 1, 1] * 50), 2)
    >>> live = Counters(2, 2)
    >>> live.record_batch(np.array([[0, 1], [1, 0], [1, 1], [0, 0]] * 40),
    ...                   np.array([1, 0, 1, 1] * 40), np.array([1, 0, 1, 1] * 40))
    >>> report = check(ref, live)
    >>> report.verdict, report.exit_code
    ('ok', 0)
    >>> live.record_batch(np.zeros((400, 2), int), np.ones(400, int), np.ones(400, int))
    >>> check(ref, live).verdict, check(ref, live).drifted
    ('drift', (0, 1))
  """
  reference = check_reference(reference)
  if not isinstance(counters, Counters):
    raise ValueError(f"counters: expected jexit.monitor.Counters, got "
                     f"{type(counters).__name__}")
  counters.validate()
  alpha = _check_rate("alpha", alpha, True, True)
  min_effect = _check_rate("min_effect", min_effect, False, False)
  if max_loss is not None:
    max_loss = _check_rate("max_loss", max_loss, False, False)
  _check_digest("policy_sha256", policy_sha256)
  if policy_sha256 is not None and counters.policy_sha256 != policy_sha256:
    raise ValueError(f"counters: counted policy {counters.policy_sha256!r}, expected the "
                     f"policy {policy_sha256!r}")
  if counters.occupancy.shape != reference.occupancy.shape:
    raise ValueError(f"counters: expected shape [K, S] = {reference.occupancy.shape} like "
                     f"the reference, got occupancy of shape {counters.occupancy.shape}")
  k = counters.num_ramps
  # Simulated p-values resolve 1 / (simulations + 1): at least 10 draws below
  # Holm's smallest threshold alpha / (K + 1).
  sims = min(SIMULATIONS, max(999, int(math.ceil(10 * (k + 1) / alpha))))
  tests = []
  for r in range(k):
    ref, live = reference.occupancy[r], counters.occupancy[r]
    if counters.nan[r]:
      # NaN signals have no bin: one more category, which the fit rows never hit.
      ref, live = np.append(ref, 0), np.append(live, counters.nan[r])
    tests.append(_drift_test(ref, live, sims))
  tests.append(_drift_test(reference.stop_hist, counters.stop_hist, sims))
  adjusted = holm([t.p_value for t in tests])
  tests = [t._replace(p_adjusted=float(p), drift=bool(p <= alpha and t.effect >= min_effect))
           for t, p in zip(tests, adjusted)]
  ramps, stops = tuple(tests[:k]), tests[k]
  drifted = tuple(r for r, t in enumerate(ramps) if t.drift)

  eps = max_loss if max_loss is not None else reference.max_loss
  budget = None
  if eps is not None:
    a = counters.audited
    d = a - counters.audit_agree
    lower, upper = clopper_pearson(d, a, alpha)
    p = binom_sf_ge(d, a, eps)
    budget = LossBound(max_loss=eps, audited=a, disagree=d, rate=d / a if a else None,
                       lower=lower, upper=upper, p_value=p, exceeded=bool(lower > eps))
  verdict = ("budget exceeded" if budget is not None and budget.exceeded
             else "drift" if drifted or stops.drift else "ok")
  return Report(verdict=verdict, ramps=ramps, stops=stops, budget=budget, drifted=drifted,
                alpha=alpha, min_effect=min_effect, num_inputs=counters.num_inputs,
                reference_inputs=reference.num_inputs, certificate=reference.certificate)
