"""Runs a torch early-exit model under an exported exit policy (no JAX).

The model is given as its K backbone `segments` and K ramp `heads`:

    logits_k = heads[k](segments[k](...segments[0](x)))

After each ramp the inputs that stop leave the batch: the hidden state is
compacted so later segments run only on the inputs still going. Per input the
runner keeps the best-so-far ramp's prediction (recall) and returns outputs in
input order. Decisions are made by `jexit.runtime.ExitTable.step` on the host
(a few hundred bytes per ramp cross the bus), so they are bit-for-bit the
numpy runtime's given the same confidences.
"""

import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from jexit import signals
from jexit.runtime import ExitTable

__all__ = ["EarlyExitRunner", "RunnerOutput", "max_softmax"]


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


class EarlyExitRunner:
  """Runs batches through segments and heads, dropping inputs as they exit.

  Args:
    segments: K backbone segments (`torch.nn.Module`s or callables).
    heads: K ramp heads; `heads[k]` maps segment k's output to `[B, C]` logits.
    table: an `ExitTable` or the path of a policy file.
    signal_fn: optional `logits [B, C] -> signal [B]`, or a sequence of K
      such functions, `signal_fn[k]` for ramp k (e.g. learned exit gates);
      required when the table bins a custom signal (`table.signal ==
      "signal"`), refused for a
      "stability" or "class" table (the runner computes their signal from each
      ramp's max softmax and prediction, `ExitTable.signal_of`). Default:
      `1 - max softmax`.
    keep_logits: also return the output ramp's logits.

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
               keep_logits: bool = True):
    if isinstance(table, (str, os.PathLike)):
      table = ExitTable.load(table)
    if not isinstance(table, ExitTable):
      raise ValueError(f"table: expected a jexit.runtime.ExitTable or a policy file "
                       f"path, got {type(table).__name__}")
    segments, heads = list(segments), list(heads)
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
    self.segments, self.heads, self.table = segments, heads, table
    self.signal_fn, self.keep_logits = signal_fn, keep_logits
    self._signal_fns = signal_fns
    self._mode_sensitive = None

  @property
  def num_ramps(self) -> int:
    return self.table.num_ramps

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

  def _logits(self, k, h, n):
    logits = self.heads[k](h)
    if logits.ndim != 2 or logits.shape[0] != n:
      raise ValueError(f"heads[{k}]: expected logits of shape [B={n}, C], "
                       f"got {tuple(logits.shape)}")
    return logits

  def _signal(self, k, logits, conf) -> np.ndarray:
    """`[B]` float64 signal on the host of a "1-conf" table (1 - conf) or of a
    "signal" table (`signal_fn`)."""
    if self.signal_fn is None:
      # In float64 from the float32 confidence, as jexit.evaluation computes it.
      return 1.0 - conf.cpu().numpy().astype(np.float64)
    signal = self._signal_fns[k](logits)
    if tuple(signal.shape) != (logits.shape[0],):
      raise ValueError(f"signal_fn: expected a [B={logits.shape[0]}] signal at ramp {k}, "
                       f"got shape {tuple(signal.shape)}")
    return signal.detach().cpu().numpy().astype(np.float64)

  @torch.inference_mode()
  def __call__(self, x: torch.Tensor) -> RunnerOutput:
    """Runs `x [B, ...]` (any device) and returns a `RunnerOutput`.

    Raises:
      ValueError: for heads that do not return `[B, C]` logits, a signal of
        the wrong shape, or NaN/out-of-range signals (per the table's modes).
    """
    self._check_eval()
    if x.ndim < 1:
      raise ValueError(f"x: expected a batch [B, ...], got a tensor of shape {tuple(x.shape)}")
    if int(x.shape[0]) == 1:
      return self._run_one(x)
    if int(x.shape[0]) == 0:
      empty = torch.zeros(0, dtype=torch.int64, device=x.device)
      return RunnerOutput(pred=empty, logits=None, stop_ramp=empty, output_ramp=empty)
    device = x.device
    b = int(x.shape[0])
    table = self.table
    stop_ramp = np.full(b, -1, np.int64)
    output_ramp = np.full(b, -1, np.int64)
    rows = np.arange(b)                          # input index of each row, on the host
    best_loss = np.full(b, np.inf, table.dtype)  # the ExitState of `table.step`
    best_ramp = np.full(b, -1, np.int64)
    tracked, prev_pred = signals.REGISTRY[table.signal].uses_previous, None
    # Per ramp run: the rows it ran on and its predictions/logits for them.
    # Outputs are gathered once at the end instead of scattered per ramp.
    ran, preds, all_logits = [], [], []
    h = x
    for k in range(self.num_ramps):
      if rows.size == 0:
        break
      h = self.segments[k](h)
      logits = self._logits(k, h, rows.size)
      if all_logits and logits.shape[1] != all_logits[0].shape[1]:
        raise ValueError(f"heads[{k}]: expected {all_logits[0].shape[1]} classes like "
                         f"heads[0], got logits of shape {tuple(logits.shape)}")
      conf, pred = max_softmax(logits)
      if tracked:  # the signal reads this ramp's and the previous ramp's predictions
        pred_host = pred.cpu().numpy()
        v = table.signal_of(k, conf.cpu().numpy().astype(np.float64), pred_host, prev_pred)
      else:
        v = self._signal(k, logits, conf)
      # The rows and k are right by construction: the rule without step's checks.
      stop, best_loss, best_ramp = table._decide(k, v, best_loss, best_ramp)
      ran.append(rows)
      preds.append(pred)
      if self.keep_logits:
        all_logits.append(logits)
      if stop.any():
        stop_ramp[rows[stop]] = k
        output_ramp[rows[stop]] = best_ramp[stop]
        keep = ~stop
        if keep.any():
          # Compact: later segments only run on the inputs still going.
          h = h.index_select(0, torch.from_numpy(np.flatnonzero(keep)).to(device))
        rows, best_loss, best_ramp = rows[keep], best_loss[keep], best_ramp[keep]
      if tracked:
        prev_pred = pred_host[~stop]
    # Row of each input's output ramp in the concatenation of what each ramp
    # ran on (`ran[j]` is sorted: compaction keeps the input order).
    offsets = np.cumsum([0] + [r.size for r in ran])
    flat = np.empty(b, np.int64)
    for j, r in enumerate(ran):
      sel = np.flatnonzero(output_ramp == j)
      if sel.size:
        flat[sel] = offsets[j] + np.searchsorted(r, sel)
    flat = torch.from_numpy(flat).to(device)
    out_pred = (preds[0] if len(preds) == 1 else torch.cat(preds)).index_select(0, flat)
    out_logits = None
    if self.keep_logits:
      out_logits = (all_logits[0] if len(all_logits) == 1 else torch.cat(all_logits)
                    ).index_select(0, flat)
    return RunnerOutput(pred=out_pred, logits=out_logits,
                        stop_ramp=torch.from_numpy(stop_ramp).to(device),
                        output_ramp=torch.from_numpy(output_ramp).to(device))

  def _run_one(self, x: torch.Tensor) -> RunnerOutput:
    """Batch size 1: plain-Python decisions (`ExitTable.decide_one`), no
    scatters; the output ramp's tensors are kept by reference."""
    table = self.table
    best_loss, best_ramp = float("inf"), -1
    out_pred = out_logits = prev_pred = None
    h = x
    for k in range(self.num_ramps):
      h = self.segments[k](h)
      logits = self._logits(k, h, 1)
      conf, pred = max_softmax(logits)
      if signals.REGISTRY[table.signal].uses_previous:
        p = int(pred.item())
        v = table.signal_one(k, float(conf.item()), p, prev_pred)
        prev_pred = p
      elif self.signal_fn is None:
        v = 1.0 - float(conf.item())
      else:
        v = float(self._signal(k, logits, conf)[0])
      stop, best_loss, best_ramp = table.decide_one(k, v, best_loss, best_ramp)
      if best_ramp == k:
        out_pred, out_logits = pred, logits
      if stop:
        break
    device = x.device
    return RunnerOutput(pred=out_pred, logits=out_logits if self.keep_logits else None,
                        stop_ramp=torch.tensor([k], device=device),
                        output_ramp=torch.tensor([best_ramp], device=device))
