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

from jexit.runtime import ExitTable

__all__ = ["EarlyExitRunner", "RunnerOutput", "max_softmax"]


class RunnerOutput(NamedTuple):
  """What `EarlyExitRunner` returns, in input order, on the input's device.

  Attributes:
    pred: `[B]` int64, prediction of the output ramp.
    logits: `[B, C]` logits of the output ramp (None if `keep_logits=False`).
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


class EarlyExitRunner:
  """Runs batches through segments and heads, dropping inputs as they exit.

  Args:
    segments: K backbone segments (`torch.nn.Module`s or callables).
    heads: K ramp heads; `heads[k]` maps segment k's output to `[B, C]` logits.
    table: an `ExitTable` or the path of a policy file.
    signal_fn: optional `logits [B, C] -> signal [B]`; required when the table
      bins a custom signal (`table.signal == "signal"`). Default:
      `1 - max softmax`.
    keep_logits: also return the output ramp's logits.

  Modules must be in eval mode (batch norm statistics would otherwise depend
  on which inputs are still in the batch); the runner refuses training mode.

  Examples:
    >>> runner = EarlyExitRunner(model.segments, model.heads, "policy.npz")  # doctest: +SKIP
    >>> out = runner(images)                                     # doctest: +SKIP
    >>> out.pred, out.stop_ramp, out.output_ramp                 # doctest: +SKIP
  """

  def __init__(self, segments: Sequence[Callable], heads: Sequence[Callable],
               table: Union[ExitTable, str, os.PathLike], *,
               signal_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
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
    if table.signal != "1-conf" and signal_fn is None:
      raise ValueError(f"signal_fn: the table bins a custom signal "
                       f"(signal={table.signal!r}), not 1 - max softmax; pass "
                       f"signal_fn(logits) -> [B] computing that signal")
    self.segments, self.heads, self.table = segments, heads, table
    self.signal_fn, self.keep_logits = signal_fn, keep_logits

  @property
  def num_ramps(self) -> int:
    return self.table.num_ramps

  def _check_eval(self):
    for kind, modules in (("segments", self.segments), ("heads", self.heads)):
      for k, m in enumerate(modules):
        if isinstance(m, torch.nn.Module) and m.training:
          raise ValueError(f"{kind}[{k}]: expected eval mode, got training mode "
                           f"(call model.eval(): batch statistics would depend on "
                           f"which inputs are still running)")

  @torch.inference_mode()
  def __call__(self, x: torch.Tensor) -> RunnerOutput:
    """Runs `x [B, ...]` (any device) and returns a `RunnerOutput`.

    Raises:
      ValueError: for heads that do not return `[B, C]` logits, a signal of
        the wrong shape, or NaN/out-of-range signals (per the table's modes).
    """
    self._check_eval()
    device = x.device
    b = int(x.shape[0])
    table = self.table
    stop_ramp = np.full(b, -1, np.int64)
    output_ramp = np.full(b, -1, np.int64)
    rows = np.arange(b)                          # host: input index of each row
    rows_dev = torch.arange(b, device=device)    # the same, for device scatters
    out_pred = torch.zeros(b, dtype=torch.int64, device=device)
    out_logits = None
    state = None
    h = x
    for k in range(self.num_ramps):
      if rows.size == 0:
        break
      h = self.segments[k](h)
      logits = self.heads[k](h)
      if logits.ndim != 2 or logits.shape[0] != rows.size:
        raise ValueError(f"heads[{k}]: expected logits of shape [B={rows.size}, C], "
                         f"got {tuple(logits.shape)}")
      conf, pred = max_softmax(logits)
      if self.signal_fn is None:
        signal = 1.0 - conf.cpu().numpy().astype(np.float64)
      else:
        signal = self.signal_fn(logits)
        if tuple(signal.shape) != (rows.size,):
          raise ValueError(f"signal_fn: expected a [B={rows.size}] signal at ramp {k}, "
                           f"got shape {tuple(signal.shape)}")
        signal = signal.detach().cpu().numpy().astype(np.float64)
      stop, state = table.step(k, signal, state)
      # Keep the prediction of the ramp each input would output if it stopped
      # now: with recall that is the best ramp so far, so only overwrite it
      # for the inputs whose best ramp became this one.
      fresh = state.best_ramp == k
      if fresh.any():
        sel = None if fresh.all() else torch.from_numpy(np.flatnonzero(fresh)).to(device)
        dst = rows_dev if sel is None else rows_dev.index_select(0, sel)
        out_pred.index_copy_(0, dst, pred if sel is None else pred.index_select(0, sel))
        if self.keep_logits:
          if out_logits is None:
            out_logits = torch.zeros((b, logits.shape[1]), dtype=logits.dtype, device=device)
          out_logits.index_copy_(0, dst, logits if sel is None else logits.index_select(0, sel))
      if stop.any():
        stop_ramp[rows[stop]] = k
        output_ramp[rows[stop]] = state.best_ramp[stop]
        keep = ~stop
        if keep.any():
          # Compact: later segments only run on the inputs still going.
          sel = torch.from_numpy(np.flatnonzero(keep)).to(device)
          h = h.index_select(0, sel)
          rows_dev = rows_dev.index_select(0, sel)
        rows, state = rows[keep], state.take(keep)
    return RunnerOutput(pred=out_pred, logits=out_logits,
                        stop_ramp=torch.from_numpy(stop_ramp).to(device),
                        output_ramp=torch.from_numpy(output_ramp).to(device))
