"""Trace validation and the `.npz` trace format (PROBLEM.md), no pickle."""

import os

import numpy as np

from jexit import signals
from jexit.checks import FLOAT32_MAX, check_float32_range
from jexit.npzio import read_npz
from jexit.types import Traces, is_int_scalar, is_real_scalar

REQUIRED_KEYS = ("conf", "pred", "cost")
OPTIONAL_KEYS = ("label", "signal", "head_cost", "position")


def _fail(field, expected, found):
  raise ValueError(f"traces.{field}: expected {expected}, got {found}")


def _describe(a):
  a = np.asarray(a)
  return f"shape {a.shape} dtype {a.dtype}"


def _array(field, a):
  """`np.asarray(a)`, or a ValueError naming the field (e.g. a ragged list)."""
  try:
    return np.asarray(a)
  except ValueError:
    _fail(field, "a rectangular array", f"a ragged {type(a).__name__}")


def _real(a):
  return np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)


def check_traces(traces: Traces) -> Traces:
  """Validates `traces` and returns it with canonical numpy dtypes.

  Raises:
    ValueError: naming the field, what was expected and what was found.
  """
  if not isinstance(traces, Traces):
    raise ValueError(f"traces: expected jexit.Traces, got {type(traces).__name__}")
  conf = _array("conf", traces.conf)
  if conf.ndim != 2 or conf.shape[0] < 1 or conf.shape[1] < 1:
    _fail("conf", "a [N, K] array with N, K >= 1", _describe(conf))
  if not _real(conf):
    _fail("conf", "real numbers", _describe(conf))
  n, k = conf.shape
  conf = conf.astype(np.float64)
  if not np.all(np.isfinite(conf)):
    bad = np.argwhere(~np.isfinite(conf))[0]
    _fail("conf", "finite values in [0, 1]", f"{conf[tuple(bad)]} at row {bad[0]}, ramp {bad[1]}")
  if conf.min() < 0 or conf.max() > 1:
    bad = np.argwhere((conf < 0) | (conf > 1))[0]
    _fail("conf", "values in [0, 1]", f"{conf[tuple(bad)]} at row {bad[0]}, ramp {bad[1]}")

  pred = _array("pred", traces.pred)
  if pred.shape != (n, k):
    _fail("pred", f"shape [N, K] = ({n}, {k}) like conf", _describe(pred))
  if not np.issubdtype(pred.dtype, np.integer):
    if np.issubdtype(pred.dtype, np.floating) and np.all(np.isfinite(pred)) and np.all(pred == np.round(pred)):
      pred = pred.astype(np.int64)
    else:
      _fail("pred", "integer class ids", _describe(pred))

  label = traces.label
  if label is not None:
    label = _array("label", label)
    if label.shape != (n,):
      _fail("label", f"shape [N] = ({n},)", _describe(label))
    if not np.issubdtype(label.dtype, np.integer):
      if np.issubdtype(label.dtype, np.floating) and np.all(np.isfinite(label)) and np.all(label == np.round(label)):
        label = label.astype(np.int64)
      else:
        _fail("label", "integer class ids", _describe(label))
    if label.size and label.min() < 0:
      bad = int(np.argmin(label))
      _fail("label", "class ids >= 0 (an unlabelled trace omits the label field: "
            "label=None, no 'label' key in the file)", f"{int(label[bad])} at row {bad}")

  cost = _array("cost", traces.cost)
  if cost.shape != (k,):
    _fail("cost", f"shape [K] = ({k},)", _describe(cost))
  if not _real(cost):
    _fail("cost", "real numbers", _describe(cost))
  cost = cost.astype(np.float64)
  if not np.all(np.isfinite(cost)) or np.any(cost < 0):
    _fail("cost", "finite values >= 0", cost.tolist())
  if cost.sum() <= 0:
    _fail("cost", "a positive total", cost.tolist())
  check_float32_range("traces.cost", cost)
  if cost[0] == 0:
    # Every input runs ramp 0: a free first ramp makes exiting there free,
    # and every speedup (total cost / mean cost) infinite.
    _fail("cost", "cost[0] > 0 (every input pays for ramp 0; a zero-cost first ramp "
          "makes speedups infinite)", cost.tolist())

  signal = traces.signal
  if signal is not None:
    signal = _array("signal", signal)
    if signal.shape != (n, k):
      _fail("signal", f"shape [N, K] = ({n}, {k}) like conf", _describe(signal))
    if not _real(signal):
      _fail("signal", "real numbers", _describe(signal))
    signal = signal.astype(np.float64)
    if not np.all(np.isfinite(signal)):
      bad = np.argwhere(~np.isfinite(signal))[0]
      _fail("signal", "finite values", f"{signal[tuple(bad)]} at row {bad[0]}, ramp {bad[1]}")
    if np.any(np.abs(signal) > FLOAT32_MAX):
      bad = np.argwhere(np.abs(signal) > FLOAT32_MAX)[0]
      _fail("signal", f"values within +-{FLOAT32_MAX:.3g} (float32's range: trace files and "
            f"policy tables keep float32)",
            f"{float(signal[tuple(bad)])!r} at row {bad[0]}, ramp {bad[1]}")
  head_cost = traces.head_cost
  if head_cost is not None:
    head_cost = _array("head_cost", head_cost)
    if head_cost.shape != (k,):
      _fail("head_cost", f"shape [K] = ({k},) like cost", _describe(head_cost))
    if not _real(head_cost):
      _fail("head_cost", "real numbers", _describe(head_cost))
    head_cost = head_cost.astype(np.float64)
    if not np.all(np.isfinite(head_cost)) or np.any(head_cost < 0) or np.any(head_cost > cost):
      _fail("head_cost", "finite values in [0, cost[k]] (the head's part of each ramp's cost)",
            f"{head_cost.tolist()} with cost {cost.tolist()}")
  position = traces.position
  if position is not None:
    position = _array("position", position)
    if position.shape != (k,):
      _fail("position", f"shape [K] = ({k},) like cost", _describe(position))
    if not np.issubdtype(position.dtype, np.integer):
      _fail("position", "integer positions", _describe(position))
    position = position.astype(np.int64)
    if np.any(position < 0) or np.any(np.diff(position) < 0):
      _fail("position", "nondecreasing integers >= 0", position.tolist())
    if head_cost is None:
      _fail("position", "head_cost as well (ramps that share a position share its segment)",
            "no head_cost")
    shared = np.flatnonzero(np.diff(position) == 0) + 1
    extra = cost[shared] - head_cost[shared]
    if np.any(np.abs(extra) > 1e-9 * cost.sum()):
      _fail("position", "cost[k] == head_cost[k] where ramp k shares the previous ramp's "
            "position (its segment is the previous ramp's)",
            f"position {position.tolist()}, cost {cost.tolist()}, head_cost {head_cost.tolist()}")
  return Traces(conf=conf, pred=pred, label=label, cost=cost, signal=signal,
                head_cost=head_cost, position=position)


def own_signal(traces: Traces) -> str:
  """The traces' own exit signal: `"signal"` if they record one, else `"1-conf"`."""
  return signals.own(traces.signal is not None)


def signal_values(traces: Traces, name: str, field: str = "signal",
                  calibration=None) -> np.ndarray:
  """`[N, K]` float64 values of the exit signal `name` of checked traces
  (`jexit.signals.values`); `field` names the argument in errors."""
  return signals.values(name, traces.conf, traces.pred, signal=traces.signal,
                        calibration=calibration, field=field)


def row_blocks(num_inputs: int, block: int):
  """Row blocks `[0, block), [block, 2 block), ...` that a split keeps together."""
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  return [np.arange(i, min(i + block, num_inputs)) for i in range(0, num_inputs, block)]


def _check_seed(seed) -> None:
  if not is_int_scalar(seed) or seed < 0:
    raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")


def split_rows(num_inputs: int, *, test_fraction: float = 0.5, seed: int = 0,
               block: int = 1):
  """Seeded disjoint `(fit_rows, test_rows)`, sorted index arrays.

  Rows are shuffled in blocks of `block` consecutive rows, which always land on
  the same side: a trace whose rows come in groups of related inputs (e.g. the
  digits traces' 4 augmented copies of one image) is split by group.
  """
  if not (is_real_scalar(test_fraction) and 0 < test_fraction < 1):
    raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
  _check_seed(seed)
  blocks = row_blocks(num_inputs, block)
  if len(blocks) < 2 and block > 1:
    raise ValueError(f"block: expected at most {max(num_inputs // 2, 1)} (at least 2 blocks "
                     f"of the {num_inputs} inputs to split), got {block!r}")
  if len(blocks) < 2:
    raise ValueError(f"traces: expected at least 2 blocks of {block} inputs to split, "
                     f"got {num_inputs} inputs")
  perm = np.random.default_rng(seed).permutation(len(blocks))
  n_test = min(max(int(round(test_fraction * len(blocks))), 1), len(blocks) - 1)
  rows = lambda idx: np.sort(np.concatenate([blocks[i] for i in idx]))
  return rows(perm[n_test:]), rows(perm[:n_test])


def fold_rows(num_inputs: int, folds: int, *, seed: int = 0, block: int = 1):
  """Seeded k-fold cross-fitting: a list of `(fit_rows, test_rows)` (blocks kept whole)."""
  blocks = row_blocks(num_inputs, block)
  if not isinstance(folds, (int, np.integer)) or folds < 2 or folds > len(blocks):
    raise ValueError(f"folds: expected an integer in [2, {len(blocks)}] (blocks of "
                     f"{block} of N={num_inputs} inputs), got {folds!r}")
  _check_seed(seed)
  perm = np.random.default_rng(seed).permutation(len(blocks))
  parts = [np.concatenate([blocks[i] for i in part]) for part in np.array_split(perm, folds)]
  return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), np.sort(parts[i]))
          for i in range(folds)]


def save_traces(path, traces: Traces) -> None:
  """Writes `traces` to a `.npz` with keys conf, pred, cost[, label, signal,
  head_cost, position]."""
  traces = check_traces(traces)
  arrays = {"conf": traces.conf.astype(np.float32), "pred": traces.pred,
            "cost": traces.cost}
  if traces.label is not None:
    arrays["label"] = traces.label
  if traces.signal is not None:
    arrays["signal"] = traces.signal.astype(np.float32)
  if traces.head_cost is not None:
    arrays["head_cost"] = traces.head_cost
  if traces.position is not None:
    arrays["position"] = traces.position
  with open(os.fspath(path), "wb") as f:
    np.savez_compressed(f, **arrays)


def load_traces(path) -> Traces:
  """Reads and validates a trace `.npz` (never unpickles).

  Raises:
    ValueError: for a missing, unknown or malformed key, or a corrupt file.
  """
  path = os.fspath(path)
  arrays = read_npz(path, "trace file")
  keys = set(arrays)
  unknown = sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
  if unknown:
    raise ValueError(
        f"trace file {path}: unknown key(s) {unknown}; expected "
        f"{list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
  missing = [key for key in REQUIRED_KEYS if key not in keys]
  if missing:
    raise ValueError(f"trace file {path}: missing key(s) {missing}")
  return check_traces(Traces(conf=arrays["conf"], pred=arrays["pred"],
                             label=arrays.get("label"), cost=arrays["cost"],
                             signal=arrays.get("signal"),
                             head_cost=arrays.get("head_cost"),
                             position=arrays.get("position")))
