"""An `ExitTable` on a torch device: its decision rule as tensor ops (no JAX).

What `jexit.runtime_torch.EarlyExitRunner` decides with, on the input's device:
the signals of a ramp's logits (`max_softmax`, `margin_signal`), the table's
arrays on one device (`DeviceTable`), the bin of a float64 signal
(`torch.bucketize(v, inner_edges, right=True)`, numpy's
`searchsorted(side="right")`), the loss and threshold gathered in the table's
dtype (so the compare is exact), the checks of the table's "error" modes, and
the counts of `counters=True` kept on the device (`Tally`). The decisions are
bit-for-bit `ExitTable`'s (`jexit.runtime_torch` says why). And the model a
placement table serves on the candidate model (`select_active`).
"""

import bisect
from typing import NamedTuple, Optional

import numpy as np
import torch

from jexit import signals
from jexit.runtime import ExitTable

__all__ = ["DeviceTable", "Step", "Tally", "bin_one", "margin_signal", "max_softmax",
           "select_active"]


def max_softmax(logits: torch.Tensor):
  """`(conf [B], pred [B])`: max softmax and argmax of `[B, C]` logits.

  Computed in float32 (float64 for float64 logits), as the trace extraction
  does, so the runtime sees the confidences the policy was fitted on.
  """
  z = logits if logits.dtype == torch.float64 else logits.float()
  return z.softmax(-1).max(-1)


def margin_signal(logits: torch.Tensor) -> torch.Tensor:
  """`[B]` margin signal of `[B, C]` logits, `1 - (top probability -
  second)` (as `jexit.runtime.margin_signal` of their softmax): the
  `signal_fn` of a table fitted on a recorded margin."""
  z = logits if logits.dtype == torch.float64 else logits.float()
  return signals.margin(z.softmax(-1), xp=torch)


# Signals whose float64 formula is additions only (1 - conf, + the changed
# flag): correctly rounded in torch as in numpy, on every device.
EXACT_SIGNALS = ("1-conf", "stability")
NEAR = 1e-12  # a torch value this close to an edge is recomputed in numpy


class Step(NamedTuple):
  """One ramp's decision for the rows it ran on (tensors on the device)."""
  stop: torch.Tensor       # [n] bool
  better: torch.Tensor     # [n] bool, this ramp became the output ramp
  best_loss: torch.Tensor  # [n] table dtype
  best_ramp: torch.Tensor  # [n] int64
  isnan: torch.Tensor      # [n] bool
  bins: torch.Tensor       # [n] int64, the signal's bin (NaN: bin 0)


class DeviceTable(NamedTuple):
  """An `ExitTable`'s arrays on one device, and its decision rule on them."""
  table: ExitTable          # the table on the host
  inner: list               # K tensors [S-1] float64, edges[k, 1:-1]
  first: torch.Tensor       # [K] float64, edges[:, 0]
  lo: torch.Tensor          # [K] float64, lowest value accepted (range_tol)
  hi: torch.Tensor          # [K] float64, highest value accepted
  loss: torch.Tensor        # [K, S] table dtype
  threshold: torch.Tensor   # [K, S] table dtype
  calibration: Optional[torch.Tensor]  # [K-1, 2C+3] float64 ("class")

  @classmethod
  def on(cls, t: ExitTable, device) -> "DeviceTable":
    """`t`'s arrays copied to `device`."""
    f64 = lambda a: torch.as_tensor(np.asarray(a, np.float64), device=device)
    dtype = torch.float64 if t.dtype == np.float64 else torch.float32
    return cls(
        table=t, inner=[f64(np.ascontiguousarray(e[1:-1])) for e in t.edges],
        first=f64(t.edges[:, 0]), lo=f64(t._lo), hi=f64(t._hi),  # pylint: disable=protected-access
        loss=torch.as_tensor(t.loss, device=device).to(dtype),
        threshold=torch.as_tensor(t.threshold, device=device).to(dtype),
        calibration=None if t.calibration is None else f64(t.calibration))

  def decide(self, k, v, best_loss, best_ramp) -> Step:
    """`ExitTable._decide` as tensor ops, for float64 signals `v [n]`."""
    isnan = torch.isnan(v)
    b = torch.bucketize(torch.where(isnan, self.first[k], v), self.inner[k], right=True)
    current = torch.where(isnan, float("inf"), self.loss[k].index_select(0, b))
    if self.table.recall:
      # `<=`: on ties the latest ramp becomes the output (PROBLEM.md).
      better = current <= best_loss
      best_loss = torch.where(better, current, best_loss)
      best_ramp = torch.where(better, k, best_ramp)
    else:
      better = torch.ones_like(isnan)
      best_loss, best_ramp = current, torch.full_like(best_ramp, k)
    if k == self.table.num_ramps - 1:
      stop = torch.ones_like(isnan)
    else:
      stop = (best_loss <= self.threshold[k].index_select(0, b)) & ~isnan
    return Step(stop, better, best_loss, best_ramp, isnan, b)

  def bins(self, k, v):
    """`(bins [n], isnan [n])` of float64 signals, as `decide` bins them."""
    isnan = torch.isnan(v)
    return torch.bucketize(torch.where(isnan, self.first[k], v), self.inner[k],
                           right=True), isnan

  def near(self, k, v) -> torch.Tensor:
    """`[n]` bool: within `NEAR` of an inner edge or of the accepted range."""
    inner = self.inner[k]
    near = (torch.bucketize(v - NEAR, inner, right=True)
            != torch.bucketize(v + NEAR, inner, right=True))
    return near | ((v - self.lo[k]).abs() <= NEAR) | ((v - self.hi[k]).abs() <= NEAR)

  def exact_values(self, k, v, conf, pred, prev_pred, rows):
    """`v` with the values at `rows` (indices) recomputed by numpy."""
    prev = None if prev_pred is None else prev_pred[rows].cpu().numpy()
    exact = self.table.signal_of(k, conf[rows].cpu().numpy().astype(np.float64),
                                 pred[rows].cpu().numpy(), prev)
    return v.index_put((rows,), torch.as_tensor(exact, device=v.device))

  def problems(self, v, isnan, k, valid):
    """0-d counts of NaN and of out-of-range signals the table refuses."""
    out = []
    if self.table.nan == "error":
      out.append((isnan & valid).sum())
    if self.table.out_of_range == "error":
      out.append(((~isnan) & ((v < self.lo[k]) | (v > self.hi[k])) & valid).sum())
    return out

  def raise_bad(self, k, v, rows, valid, b):
    """Raises the numpy runtime's error for ramp k, naming the input's index
    in the batch (`rows [n]` maps the compacted rows to it)."""
    v, rows, valid = (t.cpu().numpy() for t in (v, rows, valid))
    full = np.full(b, self.table.edges[k, 0])
    full[rows[valid]] = v[valid]
    self.table._bins(k, full)  # pylint: disable=protected-access
    raise AssertionError(f"ramp {k}: a bad signal was flagged but not found")


class Tally:
  """Counts kept on one device between reads of `EarlyExitRunner.counters`
  (adding to them needs no host sync)."""

  def __init__(self, k: int, s: int, device):
    self.occupancy = torch.zeros((k, s), dtype=torch.int64, device=device)
    self.nan = torch.zeros(k, dtype=torch.int64, device=device)
    self.stop_hist = torch.zeros(k, dtype=torch.int64, device=device)
    self.output_hist = torch.zeros(k, dtype=torch.int64, device=device)
    self.audits = []  # (pred [A, K], output_ramp [A], conf [A, K], signal [A, K])

  def stops(self, stop_ramp, output_ramp) -> None:
    ones = torch.ones_like(stop_ramp)
    self.stop_hist.index_add_(0, stop_ramp, ones)
    self.output_hist.index_add_(0, output_ramp, ones)


def bin_one(table: ExitTable, k: int, v: float):
  """`(bin, isnan)` of one signal value, as `ExitTable.bins` (Python floats)."""
  if table._lo_list[k] <= v <= table._hi_list[k]:  # pylint: disable=protected-access
    return bisect.bisect_right(table._inner_list[k], v), False  # pylint: disable=protected-access
  b, isnan = table.bins(k, np.array([v]))
  return int(b[0]), bool(isnan[0])


def _chain(parts):
  """One segment that runs `parts` in order."""
  if len(parts) == 1:
    return parts[0]
  if all(isinstance(p, torch.nn.Module) for p in parts):
    return torch.nn.Sequential(*parts)

  def run(h):
    for p in parts:
      h = p(h)
    return h
  return run


def select_active(segments, heads, table, signal_fn):
  """The deployed model of a placement table (`table.active_ramps`) on the
  candidate model: `segments [P]` and `heads [P]`, each a head or a list of
  the candidate heads at that position (as `jexit.record.record` takes them;
  candidate k is the k-th head in order). Returns `(segments [K], heads [K],
  signal_fn, active [K] tensor)`: the segments up to each active ramp merged,
  only the active heads (the others never run), and a per-candidate
  `signal_fn` list cut to the active ramps. A model that already has the
  table's K ramps, one head each, is returned as it is (active None)."""
  grouped = [list(h) if isinstance(h, (list, tuple, torch.nn.ModuleList)) else [h]
             for h in heads]
  where = [(p, j) for p, g in enumerate(grouped) for j in range(len(g))]
  active = list(table.active_ramps)
  if len(where) == table.num_ramps and all(len(g) == 1 for g in grouped):
    return segments, heads, signal_fn, None
  if active[-1] >= len(where):
    raise ValueError(f"heads: the table's active_ramps {active} index candidate ramps, the "
                     f"model has {len(where)} candidate heads")
  pos = [where[a][0] for a in active]
  if any(b <= a for a, b in zip(pos, pos[1:])):
    raise ValueError(f"table.active_ramps: expected at most one active head per position, "
                     f"got {active} at positions {pos}")
  starts = [0] + [p + 1 for p in pos[:-1]]
  new_segments = [_chain(segments[s:p + 1]) for s, p in zip(starts, pos)]
  new_heads = [grouped[where[a][0]][where[a][1]] for a in active]
  if isinstance(signal_fn, (list, tuple)) and len(signal_fn) == len(where):
    signal_fn = [signal_fn[a] for a in active]
  return new_segments, new_heads, signal_fn, torch.as_tensor(active, dtype=torch.int64)
