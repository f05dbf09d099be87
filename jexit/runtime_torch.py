"""Runs a torch early-exit model under an exported exit policy (no JAX).

The model is given as its K backbone `segments` and K ramp `heads`:

    logits_k = heads[k](segments[k](...segments[0](x)))

After each ramp the inputs that stop leave the batch: the hidden state is
compacted so later segments run only on the inputs still going. Per input the
runner keeps the best-so-far ramp's prediction (recall) and returns outputs in
input order.

Decisions are made on the input's device, as tensor ops: the ramp's signal in
float64 (`jexit.signals.REGISTRY[name].ramp(..., xp=torch)`), its bin
(`torch.bucketize(v, inner_edges, right=True)`, numpy's
`searchsorted(side="right")`), the loss and threshold gathered in the table's
dtype (so the compare is exact), the best-so-far loss, ramp, prediction and
logits kept as tensors. Per ramp one small tensor crosses to the host: the
count of inputs still going (with, in the tables' "error" modes, the counts
of NaN and out-of-range signals; with `batching="mask"`, nothing until the last
segment has run). The
decisions are bit-for-bit those of the numpy runtime (`ExitTable.run`) on the
same confidences: `1 - conf` and "stability" use only correctly rounded
float64 additions, which torch and numpy compute alike; for a signal with
logs and exps ("class"), whose last bits may differ between torch and numpy,
the few values within 1e-12 of a bin edge are recomputed by numpy.

Fixed shapes (CUDA graphs, `torch.compile`): `batching="bucket"` pads every
compacted batch to the next of a few sizes (powers of two by default), so the
segments see a bounded set of shapes; `batching="mask"` never compacts (every
segment runs on the whole batch) and syncs at most twice, after the last
segment: it saves no compute, only host round trips. benchmarks/RUNTIME.md
measured both.
"""

import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from jexit import signals
from jexit.runtime import ExitTable, _make_counters
from jexit.torch_table import (EXACT_SIGNALS, DeviceTable, Tally, bin_one, margin_signal,
                               max_softmax, select_active)

__all__ = ["EarlyExitRunner", "RunnerOutput", "margin_signal", "max_softmax"]


class RunnerOutput(NamedTuple):
  """What `EarlyExitRunner` returns, in input order, on the input's device.

  Attributes:
    pred: `[B]` int64, prediction of the output ramp.
    logits: `[B, C]` logits of the output ramp (None if `keep_logits=False`
      or B = 0).
    stop_ramp: `[B]` int64, the 0-based ramp at which each input stopped.
    output_ramp: `[B]` int64, the ramp whose prediction is output
      (`<= stop_ramp`; equal without recall).
  """
  pred: torch.Tensor
  logits: Optional[torch.Tensor]
  stop_ramp: torch.Tensor
  output_ramp: torch.Tensor


BATCHING = ("compact", "bucket", "mask")


class EarlyExitRunner:
  """Runs batches through segments and heads, dropping inputs as they exit.

  Args:
    segments: K backbone segments (`torch.nn.Module`s or callables).
    heads: K ramp heads; `heads[k]` maps segment k's output to `[B, C]` logits.
    table: an `ExitTable` or the path of a policy file. A placement table
      (`table.active_ramps`) also runs on the full candidate model (segments
      and heads as `jexit.record.record` takes them): only the active heads
      run, the segments between them are merged, and `stop_ramp` and
      `output_ramp` are candidate indices.
    signal_fn: optional `logits [B, C] -> signal [B]`, or a sequence of K
      such functions, `signal_fn[k]` for ramp k (e.g. learned exit gates);
      required when the table bins a custom signal (`table.signal ==
      "signal"`), refused for a
      "stability" or "class" table (the runner computes their signal from each
      ramp's max softmax and prediction, `jexit.signals`). Default:
      `1 - max softmax`.
    keep_logits: also return the output ramp's logits.
    batching: "compact" (default): the inputs still going are gathered into
      a smaller batch after every ramp. "bucket": the same, padded up to the
      next of `bucket_sizes` (fixed shapes for CUDA graphs or
      `torch.compile`; the padding rows' results are dropped). "mask": no
      compaction and no host sync; every segment runs on the whole batch.
    bucket_sizes: the batch sizes of "bucket" (default: powers of two, and
      the batch size itself).
    counters: keep a `jexit.counters.Counters` in `.counters` (counted on the
      input's device with index_add, read to the host when `.counters` is
      read; docs/monitor.md). Decisions are the same as without.
    audit: with counters, the share of inputs (a seeded draw per batch,
      `seed`) that run to the final ramp whatever the policy says; their
      served output stays the policy's and their whole rows (conf, pred,
      signal per ramp) go into the counters.

  Batch/instance norm and dropout layers must be in eval mode (batch norm
  statistics would otherwise depend on which inputs are still in the batch):
  the runner refuses them in training mode. Other layers whose behaviour
  depends on the mode cannot be detected: call `model.eval()`.

  Examples:
    >>> runner = EarlyExitRunner(model.segments, model.heads, "policy.npz")  # doctest: +SKIP
    >>> out = runner(images)                                     # doctest: +SKIP
    >>> out.pred, out.stop_ramp, out.output_ramp                 # doctest: +SKIP
  """

  def __init__(self, segments: Sequence[Callable], heads: Sequence[Callable],
               table: Union[ExitTable, str, os.PathLike], *,
               signal_fn: Union[None, Callable[[torch.Tensor], torch.Tensor],
                                Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
               keep_logits: bool = True, batching: str = "compact",
               bucket_sizes: Optional[Sequence[int]] = None,
               counters: bool = False, audit: float = 0.0, seed=None):
    if isinstance(table, (str, os.PathLike)):
      table = ExitTable.load(table)
    if not isinstance(table, ExitTable):
      raise ValueError(f"table: expected a jexit.runtime.ExitTable or a policy file "
                       f"path, got {type(table).__name__}")
    segments, heads = list(segments), list(heads)
    self._active = None
    if table.active_ramps is not None and len(segments) == len(heads):
      segments, heads, signal_fn, self._active = select_active(segments, heads, table,
                                                               signal_fn)
    if len(segments) != len(heads):
      raise ValueError(f"heads: expected one head per segment ({len(segments)}), "
                       f"got {len(heads)}")
    if len(segments) != table.num_ramps:
      raise ValueError(f"segments: the table has K={table.num_ramps} ramps, the model "
                       f"{len(segments)} segments/heads (a table for another model?)")
    entry = signals.REGISTRY[table.signal]
    if not entry.from_outputs and signal_fn is None:
      raise ValueError(f"signal_fn: the table bins a custom signal "
                       f"(signal={table.signal!r}), not 1 - max softmax; pass "
                       f"signal_fn(logits) -> [B] computing that signal")
    if entry.uses_previous and signal_fn is not None:
      raise ValueError(f"signal_fn: a {table.signal!r} table's signal comes from the ramps' "
                       f"confidences and predictions; expected signal_fn=None")
    if signal_fn is None or callable(signal_fn):
      signal_fns = [signal_fn] * len(segments)
    elif isinstance(signal_fn, (list, tuple)) and all(callable(f) for f in signal_fn):
      signal_fns = list(signal_fn)
      if len(signal_fns) != len(segments):
        raise ValueError(f"signal_fn: expected one function per ramp (K={len(segments)}), "
                         f"got {len(signal_fns)}")
    else:
      raise ValueError(f"signal_fn: expected a function logits -> signal or a list of K "
                       f"of them, got {type(signal_fn).__name__}")
    if batching not in BATCHING:
      raise ValueError(f"batching: expected one of {list(BATCHING)}, got {batching!r}")
    if bucket_sizes is not None:
      sizes = list(bucket_sizes)
      if (batching != "bucket" or not sizes
          or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)):
        raise ValueError(f"bucket_sizes: expected ints >= 1 with batching='bucket', got "
                         f"{bucket_sizes!r} with batching={batching!r}")
      bucket_sizes = tuple(sorted(set(sizes)))
    self.segments, self.heads, self.table = segments, heads, table
    self.signal_fn, self.keep_logits = signal_fn, keep_logits
    self.batching, self.bucket_sizes = batching, bucket_sizes
    self._signal_fns = signal_fns
    self._entry = entry
    # Values the runner computes with logs/exps get checked against numpy near edges.
    self._exact = signal_fn is not None or table.signal in EXACT_SIGNALS
    self._mode_sensitive = None
    self._tables = {}
    self._counters, self.audit, self._rng = _make_counters(table, counters, audit, seed)
    self._tallies = {}  # device -> _Tally
    self._pending_inputs = 0

  @property
  @torch.inference_mode()  # the tallies are inference tensors (made in __call__)
  def counters(self):
    """The `jexit.counters.Counters` of every input served so far (None
    without `counters=True`); reading it moves the device counts to the host."""
    c = self._counters
    if c is None:
      return None
    if self._pending_inputs:
      for tally in self._tallies.values():
        for name in ("occupancy", "nan", "stop_hist", "output_hist"):
          t = getattr(tally, name)
          setattr(c, name, getattr(c, name) + t.cpu().numpy())
          t.zero_()
      c.num_inputs += self._pending_inputs
      self._pending_inputs = 0
      for tally in self._tallies.values():
        for pred, out, conf, sig in tally.audits:
          c.record_audit(pred.cpu().numpy(), out.cpu().numpy(), conf=conf.cpu().numpy(),
                         signal=None if not c.keeps_signal else sig.cpu().numpy())
        tally.audits.clear()
    return c

  def _tally(self, device) -> Optional[Tally]:
    if self._counters is None:
      return None
    tally = self._tallies.get(device)
    if tally is None:
      tally = self._tallies[device] = Tally(self.num_ramps, self.table.num_bins, device)
    return tally

  def _audit_draw(self, b: int) -> Optional[np.ndarray]:
    """`[b]` bool from the seeded generator, or None when nothing is audited."""
    if self._counters is None or self.audit == 0:
      return None
    draw = self._rng.random(b) < self.audit
    return draw if draw.any() else None

  @property
  def num_ramps(self) -> int:
    return self.table.num_ramps

  @property
  def certificate(self) -> Optional[dict]:
    """The table's certificate (`ExitTable.certificate`; `describe()` says it in words)."""
    return self.table.certificate

  @property
  def budget(self) -> Optional[dict]:
    """The loss budget the table was chosen for (`ExitTable.budget`), or None."""
    return self.table.budget

  def _check_eval(self):
    # Only layers whose output depends on the mode matter (a plain Linear in
    # training mode computes the same thing); found once, checked per call.
    if self._mode_sensitive is None:
      kinds = (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)
      self._mode_sensitive = [
          (f"{kind}[{k}]", name, m)
          for kind, modules in (("segments", self.segments), ("heads", self.heads))
          for k, module in enumerate(modules) if isinstance(module, torch.nn.Module)
          for name, m in module.named_modules() if isinstance(m, kinds)]
    for where, name, m in self._mode_sensitive:
      if m.training:
        raise ValueError(f"{where}: expected eval mode, got {type(m).__name__} "
                         f"{name or '(itself)'} in training mode (call model.eval(): "
                         f"its output would depend on which inputs are still running)")

  def _device_table(self, device) -> DeviceTable:
    dt = self._tables.get(device)
    if dt is None:
      dt = self._tables[device] = DeviceTable.on(self.table, device)
    return dt

  def _logits(self, k, h, n, num_classes=None):
    logits = self.heads[k](h)
    if logits.ndim != 2 or logits.shape[0] != n:
      raise ValueError(f"heads[{k}]: expected logits of shape [B={n}, C], "
                       f"got {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
      raise ValueError(f"heads[{k}]: expected {num_classes} classes like "
                       f"heads[0], got logits of shape {tuple(logits.shape)}")
    return logits

  def _user_signal(self, k, logits) -> torch.Tensor:
    signal = self._signal_fns[k](logits)
    if tuple(signal.shape) != (logits.shape[0],):
      raise ValueError(f"signal_fn: expected a [B={logits.shape[0]}] signal at ramp {k}, "
                       f"got shape {tuple(signal.shape)}")
    return signal

  def _values(self, k, logits, conf, pred, prev_pred, dt) -> torch.Tensor:
    """`[n]` float64 signal of ramp k on the device."""
    if self.signal_fn is not None:
      return self._user_signal(k, logits).detach().to(torch.float64)
    # In float64 from the float32 confidence, as jexit.evaluation computes it.
    return self._entry.ramp(k, conf.to(torch.float64), pred, prev_pred, dt.calibration, torch)

  def _count_one(self, k: int, v: float) -> None:
    """Counts one input's bin at ramp k (the batch-size-1 path)."""
    b, isnan = bin_one(self.table, k, v)
    if isnan:
      self._counters.nan[k] += 1
    else:
      self._counters.occupancy[k, b] += 1

  def _bucket(self, n: int, b: int) -> int:
    if self.bucket_sizes is None:
      return min(1 << (n - 1).bit_length(), b)
    return next((s for s in self.bucket_sizes if s >= n), n)

  @torch.inference_mode()
  def __call__(self, x: torch.Tensor) -> RunnerOutput:
    """Runs `x [B, ...]` (any device) and returns a `RunnerOutput`; with a
    placement table on the candidate model, ramps are candidate indices.

    Raises:
      ValueError: for heads that do not return `[B, C]` logits, a signal of
        the wrong shape, or NaN/out-of-range signals (per the table's modes).
    """
    out = self._dispatch(x)
    if self._active is None:
      return out
    active = self._active.to(out.stop_ramp.device)
    return out._replace(stop_ramp=active[out.stop_ramp], output_ramp=active[out.output_ramp])

  def _dispatch(self, x: torch.Tensor) -> RunnerOutput:
    self._check_eval()
    if x.ndim < 1:
      raise ValueError(f"x: expected a batch [B, ...], got a tensor of shape {tuple(x.shape)}")
    b = int(x.shape[0])
    if b == 0:
      empty = torch.zeros(0, dtype=torch.int64, device=x.device)
      return RunnerOutput(pred=empty, logits=None, stop_ramp=empty, output_ramp=empty)
    draw = self._audit_draw(b)
    if self._counters is not None:
      self._pending_inputs += b
    if b == 1 and self.batching == "compact" and draw is None:
      return self._run_one(x)
    if self.batching == "mask":
      return self._run_masked(x, draw)
    return self._run_compacted(x, draw)

  def _run_compacted(self, x: torch.Tensor, draw: Optional[np.ndarray] = None
                     ) -> RunnerOutput:
    device, b = x.device, int(x.shape[0])
    dt = self._device_table(device)
    tally = self._tally(device)
    # Audited rows (`draw`) run on after the policy stopped them (`done`);
    # their outputs are written when the policy stops them, never after.
    aud = done = None
    if draw is not None:
      aud = torch.as_tensor(draw, device=device)
      done = torch.zeros(b, dtype=torch.bool, device=device)
      k_count = self.num_ramps
      a_conf = torch.full((k_count, b + 1), float("nan"), dtype=torch.float64, device=device)
      a_pred = torch.zeros((k_count, b + 1), dtype=torch.int64, device=device)
      a_sig = torch.full_like(a_conf, float("nan"))
    tracked = self._entry.uses_previous
    dtype = dt.loss.dtype
    # Outputs have a spare last row: padding rows (batching="bucket") write there.
    out_stop = torch.empty(b + 1, dtype=torch.int64, device=device)
    out_ramp = torch.empty_like(out_stop)
    out_pred = torch.empty_like(out_stop)
    out_logits = None
    rows = torch.arange(b, device=device)        # input index of each row
    valid = torch.ones(b, dtype=torch.bool, device=device)  # False: padding
    best_loss = torch.full((b,), float("inf"), dtype=dtype, device=device)
    best_ramp = torch.full((b,), -1, dtype=torch.int64, device=device)
    best_pred = best_logits = prev_pred = None
    num_classes = None
    h = x
    for k in range(self.num_ramps):
      h = self.segments[k](h)
      n = int(h.shape[0])
      logits = self._logits(k, h, n, num_classes)
      num_classes = int(logits.shape[1])
      conf, pred = max_softmax(logits)
      v = self._values(k, logits, conf, pred, prev_pred, dt)
      step = dt.decide(k, v, best_loss, best_ramp)
      served = valid if done is None else valid.logical_and(done.logical_not())
      going = step.stop.logical_not().logical_and(served)
      if aud is not None:
        going = going.logical_or(aud.logical_and(valid))
      checks = dt.problems(v, step.isnan, k, served)
      near = None if self._exact else dt.near(k, v).logical_and(valid)
      counts = torch.stack([going.sum()] + checks + ([] if near is None else [near.sum()])
                           ).tolist()  # the one host sync of this ramp
      if near is not None and counts[-1]:
        # Rare: a value within 1e-12 of an edge, where torch's last bits could
        # pick another bin than numpy's; take numpy's and decide again.
        v = dt.exact_values(k, v, conf, pred, prev_pred, near.nonzero().squeeze(1))
        step = dt.decide(k, v, best_loss, best_ramp)
        going = step.stop.logical_not().logical_and(served)
        if aud is not None:
          going = going.logical_or(aud.logical_and(valid))
        checks = dt.problems(v, step.isnan, k, served)
        counts = torch.stack([going.sum()] + checks).tolist()
      if any(counts[1:1 + len(checks)]):
        dt.raise_bad(k, v, rows, served, b)
      if tally is not None:
        counted = served.logical_and(step.isnan.logical_not())
        tally.occupancy[k].index_add_(0, step.bins, counted.to(torch.int64))
        tally.nan[k] += served.logical_and(step.isnan).sum()
      if aud is not None:
        at = torch.where(aud.logical_and(valid), rows, b)
        a_conf[k].index_copy_(0, at, conf.to(torch.float64))
        a_pred[k].index_copy_(0, at, pred)
        a_sig[k].index_copy_(0, at, v)
      n_going = counts[0]
      best_loss, best_ramp = step.best_loss, step.best_ramp
      if best_pred is None:  # ramp 0: every row's best so far is itself
        best_pred = pred
        best_logits = logits if self.keep_logits else None
        if self.keep_logits:
          out_logits = torch.empty((b + 1, num_classes), dtype=logits.dtype, device=device)
      else:
        best_pred = torch.where(step.better, pred, best_pred)
        if self.keep_logits:
          best_logits = torch.where(step.better[:, None], logits.to(best_logits.dtype),
                                    best_logits)
      # Every row's current result; the rows going on overwrite theirs later.
      target = torch.where(served, rows, b)
      out_stop.index_fill_(0, target, k)
      out_ramp.index_copy_(0, target, best_ramp)
      out_pred.index_copy_(0, target, best_pred)
      if self.keep_logits:
        out_logits.index_copy_(0, target, best_logits)
      if n_going == 0 or k == self.num_ramps - 1:
        break
      size = n_going if self.batching == "compact" else self._bucket(n_going, b)
      keep = _rows_of(going, size)
      # Compact: later segments only run on the inputs still going.
      h = h.index_select(0, keep)
      rows = rows.index_select(0, keep)
      valid = torch.arange(size, device=device) < n_going
      if aud is not None:
        done = done.logical_or(step.stop).index_select(0, keep)
        aud = aud.index_select(0, keep)
      best_loss, best_ramp = best_loss.index_select(0, keep), best_ramp.index_select(0, keep)
      best_pred = best_pred.index_select(0, keep)
      if self.keep_logits:
        best_logits = best_logits.index_select(0, keep)
      if tracked:
        prev_pred = pred.index_select(0, keep)
    if tally is not None:
      tally.stops(out_stop[:b], out_ramp[:b])
      if draw is not None:
        idx = torch.as_tensor(np.flatnonzero(draw), device=device)
        tally.audits.append((a_pred.index_select(1, idx).T, out_ramp.index_select(0, idx),
                             a_conf.index_select(1, idx).T, a_sig.index_select(1, idx).T))
    return RunnerOutput(pred=out_pred[:b], logits=None if out_logits is None else out_logits[:b],
                        stop_ramp=out_stop[:b], output_ramp=out_ramp[:b])

  def _run_masked(self, x: torch.Tensor, draw: Optional[np.ndarray] = None) -> RunnerOutput:
    """batching="mask": every segment on the whole batch, then the decisions;
    host syncs only for the table's "error" modes and the "class" near-edge
    check, once each, after the last segment."""
    device, b = x.device, int(x.shape[0])
    dt = self._device_table(device)
    h, outputs, num_classes = x, [], None
    for k in range(self.num_ramps):
      h = self.segments[k](h)
      logits = self._logits(k, h, b, num_classes)
      num_classes = int(logits.shape[1])
      conf, pred = max_softmax(logits)
      prev = outputs[-1][2] if outputs and self._entry.uses_previous else None
      outputs.append((logits, conf, pred, self._values(k, logits, conf, pred, prev, dt)))
    values = [o[3] for o in outputs]
    if not self._exact:
      near = [dt.near(k, v) for k, v in enumerate(values)]
      if any(torch.stack([m.any() for m in near]).tolist()):
        for k, m in enumerate(near):
          prev = outputs[k - 1][2] if k else None
          values[k] = dt.exact_values(k, values[k], outputs[k][1], outputs[k][2], prev,
                                      m.nonzero().squeeze(1))
    dtype = dt.loss.dtype
    active = torch.ones(b, dtype=torch.bool, device=device)
    best_loss = torch.full((b,), float("inf"), dtype=dtype, device=device)
    best_ramp = torch.full((b,), -1, dtype=torch.int64, device=device)
    best_pred, best_logits = outputs[0][2], outputs[0][0]
    out_stop = torch.full((b,), -1, dtype=torch.int64, device=device)
    out_ramp, out_pred = out_stop.clone(), out_stop.clone()
    out_logits = torch.zeros_like(best_logits) if self.keep_logits else None
    problems, actives = [], []
    for k, (logits, _, pred, _) in enumerate(outputs):
      step = dt.decide(k, values[k], best_loss, best_ramp)
      problems.append(dt.problems(values[k], step.isnan, k, active))
      actives.append(active)
      best_loss, best_ramp = step.best_loss, step.best_ramp
      best_pred = torch.where(step.better, pred, best_pred)
      now = active & step.stop
      out_stop = torch.where(now, k, out_stop)
      out_ramp = torch.where(now, best_ramp, out_ramp)
      out_pred = torch.where(now, best_pred, out_pred)
      if self.keep_logits:
        best_logits = torch.where(step.better[:, None], logits.to(best_logits.dtype),
                                  best_logits)
        out_logits = torch.where(now[:, None], best_logits, out_logits)
      active = active & ~step.stop
    tally = self._tally(device)
    if tally is not None:
      for k, act in enumerate(actives):
        step_bins, isnan = dt.bins(k, values[k])
        tally.occupancy[k].index_add_(0, step_bins, (act & ~isnan).to(torch.int64))
        tally.nan[k] += (act & isnan).sum()
      tally.stops(out_stop, out_ramp)
      if draw is not None:
        # Every segment ran on every row: the audit only records them.
        idx = torch.as_tensor(np.flatnonzero(draw), device=device)
        pick = lambda ts, dtype: torch.stack([t.index_select(0, idx).to(dtype) for t in ts], 1)
        tally.audits.append((pick([o[2] for o in outputs], torch.int64),
                             out_ramp.index_select(0, idx),
                             pick([o[1] for o in outputs], torch.float64),
                             pick(values, torch.float64)))
    if problems[0]:
      flags = torch.stack([torch.stack(p) for p in problems]).tolist()  # [K, 1 or 2]
      bad = next((k for k, f in enumerate(flags) if any(f)), None)
      if bad is not None:
        rows = torch.arange(b, device=device)
        dt.raise_bad(bad, values[bad], rows, actives[bad], b)
    return RunnerOutput(pred=out_pred, logits=out_logits, stop_ramp=out_stop,
                        output_ramp=out_ramp)

  def _run_one(self, x: torch.Tensor) -> RunnerOutput:
    """Batch size 1: plain-Python decisions (`ExitTable.decide_one`), no
    tensor bookkeeping; the output ramp's tensors are kept by reference."""
    table = self.table
    best_loss, best_ramp = float("inf"), -1
    out_pred = out_logits = prev_pred = None
    h = x
    for k in range(self.num_ramps):
      h = self.segments[k](h)
      logits = self._logits(k, h, 1)
      conf, pred = max_softmax(logits)
      if self._entry.uses_previous:
        p = int(pred.item())
        v = table.signal_one(k, float(conf.item()), p, prev_pred)
        prev_pred = p
      elif self.signal_fn is None:
        v = 1.0 - float(conf.item())
      else:
        v = float(self._user_signal(k, logits).item())
      stop, best_loss, best_ramp = table.decide_one(k, v, best_loss, best_ramp)
      if self._counters is not None:
        self._count_one(k, v)
      if best_ramp == k:
        out_pred, out_logits = pred, logits
      if stop:
        break
    if self._counters is not None:
      c = self._counters  # counted on the host directly, not on a device
      c.stop_hist[k] += 1
      c.output_hist[best_ramp] += 1
      c.num_inputs += 1
      self._pending_inputs -= 1
    device = x.device
    return RunnerOutput(pred=out_pred, logits=out_logits if self.keep_logits else None,
                        stop_ramp=torch.tensor([k], device=device),
                        output_ramp=torch.tensor([best_ramp], device=device))


def _rows_of(going: torch.Tensor, size: int) -> torch.Tensor:
  """`[size]` indices of the True entries of `going`, padded with 0 (a row
  that exists) beyond their count; no host sync where torch allows."""
  try:
    return torch.nonzero_static(going, size=size, fill_value=0).squeeze(1)
  except (RuntimeError, NotImplementedError):  # a device without nonzero_static
    idx = torch.nonzero(going).squeeze(1)
    return torch.cat([idx, idx.new_zeros(size - len(idx))]) if size > len(idx) else idx
