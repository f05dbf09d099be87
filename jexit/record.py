"""Records a trace from any torch early-exit model (needs the `torch` extra).

The model is given exactly as `jexit.runtime_torch.EarlyExitRunner` takes it,
as P backbone `segments` and one ramp head after each:

    logits_k = heads[k](segments[k](...segments[0](x)))

`record` runs it over data in batched `torch.no_grad()` passes and returns a
`jexit.Traces`: per ramp the max softmax (`conf`, computed as the runtimes
compute it: `runtime_torch.max_softmax`), the argmax (`pred`), optionally a
recorded signal, the labels when the data has them, and the cost of each ramp
split into its backbone segment and its head (`cost`, `head_cost`), in FLOPs
(`torch.utils.flop_counter.FlopCounterMode`) or in measured milliseconds.

Several candidate heads may sit after one segment (ramp placement,
PROBLEM.md): give `heads[p]` as a list of heads. Each head is one trace column
(`K` columns in all, in order), `Traces.position[k]` is its segment, and a
head that shares the previous column's segment costs only itself
(`cost[k] == head_cost[k]`).

Example (a model with two segments and one head after each):

    >>> from jexit.record import record                           # doctest: +SKIP
    >>> traces = record(model.segments, model.heads, (images, labels),
    ...                 batch_size=256, signal="margin")          # doctest: +SKIP
    >>> jexit.save_traces("trace.npz", traces)                    # doctest: +SKIP

Nothing here imports JAX.
"""

import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from jexit import signals
from jexit.runtime_torch import max_softmax
from jexit.traces import check_traces
from jexit.types import Traces

__all__ = ["COSTS", "count_flops", "default_device", "flops_of", "measure_latency", "record",
           "resolve_device"]

COSTS = ("flops", "latency")
SignalArg = Union[None, str, Callable[[torch.Tensor], torch.Tensor],
                  Sequence[Callable[[torch.Tensor], torch.Tensor]]]


def default_device() -> torch.device:
  """CUDA when torch sees a GPU, else the CPU."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None, field: str = "device") -> torch.device:
  """`device` (None, a string like "cpu"/"cuda:0" or a `torch.device`) as a
  usable `torch.device`, or a ValueError naming `field`."""
  if device is None:
    return default_device()
  try:
    device = torch.device(device)
  except (RuntimeError, TypeError, ValueError) as e:
    raise ValueError(f"{field}: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
  if device.type == "cuda":
    if not torch.cuda.is_available():
      raise ValueError(f"{field}: expected a device this machine has, got {str(device)!r} "
                       f"but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device.index is not None and device.index >= torch.cuda.device_count():
      raise ValueError(f"{field}: expected a CUDA device index below "
                       f"{torch.cuda.device_count()}, got {str(device)!r}")
  elif device.type != "cpu":
    raise ValueError(f"{field}: expected 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
  return device


# --------------------------------------------------------------- the model

def _groups(segments, heads) -> Tuple[list, List[list]]:
  """`(segments [P], groups [P] of lists of heads)`, checked."""
  segments = list(segments)
  heads = list(heads)
  if not segments:
    raise ValueError("segments: expected at least one backbone segment, got none")
  if len(heads) != len(segments):
    raise ValueError(f"heads: expected one head (or a list of candidate heads) per segment "
                     f"({len(segments)}), got {len(heads)}")
  groups = []
  for p, h in enumerate(heads):
    group = list(h) if isinstance(h, (list, tuple, torch.nn.ModuleList)) else [h]
    if not group:
      raise ValueError(f"heads[{p}]: expected a head or a non-empty list of heads, got an "
                       f"empty list")
    for j, g in enumerate(group):
      if not callable(g):
        raise ValueError(f"{_head_name(p, j, len(group) > 1)}: expected a callable head "
                         f"(e.g. a torch.nn.Module), got {type(g).__name__}")
    groups.append(group)
  for p, s in enumerate(segments):
    if not callable(s):
      raise ValueError(f"segments[{p}]: expected a callable segment (e.g. a torch.nn.Module), "
                       f"got {type(s).__name__}")
  return segments, groups


def _head_name(p: int, j: int, grouped: bool) -> str:
  return f"heads[{p}][{j}]" if grouped else f"heads[{p}]"


def _prepare(modules, device):
  """Moves `torch.nn.Module`s to `device` and sets eval mode (in place)."""
  for m in modules:
    if isinstance(m, torch.nn.Module):
      m.to(device)
      m.eval()


def _check_logits(name, logits, b, num_classes):
  if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != b:
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    raise ValueError(f"{name}: expected logits of shape [B={b}, C], got {shape}")
  if logits.shape[1] < 2:
    raise ValueError(f"{name}: expected logits over C >= 2 classes, got shape "
                     f"{tuple(logits.shape)}")
  if num_classes is not None and logits.shape[1] != num_classes:
    raise ValueError(f"heads: expected every head to give the same number of classes; "
                     f"the first gives {num_classes}, {name} gives {logits.shape[1]}")
  return int(logits.shape[1])


# ------------------------------------------------------------------ the data

def _batches(data, batch_size: int):
  """Yields `(x [B, ...], y [B] or None)` batches of `data`."""
  if isinstance(data, torch.Tensor):
    if data.ndim < 1:
      raise ValueError(f"data: expected a batch of inputs [N, ...], got a tensor of shape "
                       f"{tuple(data.shape)}")
    for i in range(0, len(data), batch_size):
      yield data[i:i + batch_size], None
    return
  if (isinstance(data, (tuple, list)) and len(data) == 2
      and all(isinstance(a, torch.Tensor) for a in data)):
    x, y = data
    if x.ndim < 1 or y.shape != (len(x),):
      raise ValueError(f"data: expected (inputs [N, ...], labels [N]), got shapes "
                       f"{tuple(x.shape)} and {tuple(y.shape)}")
    for i in range(0, len(x), batch_size):
      yield x[i:i + batch_size], y[i:i + batch_size]
    return
  if isinstance(data, torch.utils.data.Dataset):
    data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
  if not isinstance(data, torch.utils.data.DataLoader):
    raise ValueError(f"data: expected a tensor [N, ...], a pair (inputs, labels), a "
                     f"torch Dataset or a DataLoader, got {type(data).__name__}")
  for batch in data:
    if isinstance(batch, torch.Tensor):
      yield batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
      y = batch[1] if len(batch) > 1 else None
      if y is not None and not (isinstance(y, torch.Tensor) and y.shape == (len(batch[0]),)):
        raise ValueError(f"data: expected batches (inputs [B, ...], labels [B]), got labels "
                         f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} for "
                         f"{len(batch[0])} inputs")
      yield batch[0], y
    else:
      raise ValueError(f"data: expected batches of a tensor or (inputs, labels), got "
                       f"{type(batch).__name__}")


def _num_batches(data, batch_size) -> Optional[int]:
  try:
    if isinstance(data, torch.utils.data.DataLoader):
      return len(data)
    n = len(data[0]) if isinstance(data, (tuple, list)) else len(data)
    return -(-n // batch_size)
  except TypeError:  # an iterable dataset has no length
    return None


# ------------------------------------------------------------------- costs

def flops_of(fn: Callable[[], object]) -> int:
  """FLOPs that `FlopCounterMode` counts in one call of `fn()`."""
  with FlopCounterMode(display=False) as counter:
    fn()
  return int(counter.get_total_flops())


@torch.no_grad()
def count_flops(segments, heads, example: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
  """FLOPs of each segment and of each head on one input.

  Counts what `FlopCounterMode` counts (convolutions and matrix products, 2
  FLOPs per multiply-add; pooling, normalisation and activations are free).

  Args:
    segments: P segments; heads: P heads or lists of heads (module docstring).
    example: `[1, ...]` one input, on the modules' device.

  Returns:
    `(segment_flops [P], head_flops [K])` int64, K the number of heads.
  """
  segments, groups = _groups(segments, heads)
  seg, head = [], []
  h = example
  for segment, group in zip(segments, groups):
    x = h
    seg.append(flops_of(lambda: segment(x)))
    h = segment(h)
    head.extend(flops_of(lambda g=g: g(h)) for g in group)
  return np.asarray(seg, np.int64), np.asarray(head, np.int64)


@torch.no_grad()
def measure_latency(segments, heads, batch: torch.Tensor, *, warmup: int = 10,
                    repeats: int = 50) -> Tuple[np.ndarray, np.ndarray]:
  """Median wall-clock milliseconds of each segment and each head on `batch`.

  Warms up first (allocator, cuDNN/oneDNN kernel choice, caches), then times
  every segment and head once per repeat, interleaved, so that drift (clock
  boost, other processes) hits them alike; the median drops outliers. CUDA is
  synchronised around every timed call, since kernels run asynchronously.

  Args:
    segments, heads: as `count_flops`, on `batch`'s device, in eval mode.
    batch: `[B, ...]` the inputs to time them on.
    warmup: untimed full passes first. repeats: timed passes (>= 1).

  Returns:
    `(segment_ms [P], head_ms [K])` float64, ms per call on B inputs.
  """
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
  segments, groups = _groups(segments, heads)
  cuda = batch.device.type == "cuda"
  sync = (lambda: torch.cuda.synchronize(batch.device)) if cuda else (lambda: None)
  inputs = []  # each segment's input, computed once
  h = batch
  for segment in segments:
    inputs.append(h)
    h = segment(h)
  outputs = inputs[1:] + [h]
  for _ in range(warmup):
    for segment, group, x, y in zip(segments, groups, inputs, outputs):
      segment(x)
      for g in group:
        g(y)
  sync()
  flat = [(segment, x) for segment, x in zip(segments, inputs)]
  flat += [(g, y) for group, y in zip(groups, outputs) for g in group]
  times = np.zeros((repeats, len(flat)))
  for r in range(repeats):
    for i, (fn, x) in enumerate(flat):
      sync()
      start = time.perf_counter()
      fn(x)
      sync()
      times[r, i] = time.perf_counter() - start
  ms = 1e3 * np.median(times, axis=0)
  return ms[:len(segments)], ms[len(segments):]


def _split_costs(segment_cost, head_cost, position):
  """`(cost [K], head_cost [K])`: the first head at a position pays its segment."""
  first = np.r_[True, np.diff(position) > 0]
  head_cost = np.asarray(head_cost, np.float64)
  cost = head_cost + np.where(first, np.asarray(segment_cost, np.float64)[position], 0.0)
  return cost, head_cost


# ------------------------------------------------------------------ record

def _signal_fns(signal, k_count):
  """`(name, fns)`: a recorded signal's name, or K functions of logits."""
  if signal is None:
    return None, None
  if isinstance(signal, str):
    if signal not in signals.RECORDED:
      raise ValueError(f"signal: expected one of {sorted(signals.RECORDED)}, a function "
                       f"logits [B, C] -> [B] or a list of K of them, got {signal!r}")
    return signal, None
  if callable(signal):
    return None, [signal] * k_count
  if isinstance(signal, (list, tuple)) and all(callable(f) for f in signal):
    if len(signal) != k_count:
      raise ValueError(f"signal: expected one function per ramp (K={k_count}), got "
                       f"{len(signal)}")
    return None, list(signal)
  raise ValueError(f"signal: expected None, one of {sorted(signals.RECORDED)}, a function "
                   f"logits [B, C] -> [B] or a list of K of them, got {type(signal).__name__}")


@torch.no_grad()
def record(segments: Sequence[Callable], heads: Sequence, data, *, batch_size: int = 256,
           device=None, signal: SignalArg = None, cost: str = "flops",
           latency_batch_size: int = 1, warmup: int = 10, repeats: int = 50,
           progress: bool = True, desc: str = "record") -> Traces:
  """Runs an early-exit model over `data` and returns its trace.

  Args:
    segments: P backbone segments (modules or callables).
    heads: P ramp heads, `heads[p]` reading segment p's output; an entry may
      be a list of candidate heads at that position (one trace column each).
      Modules are moved to `device` and set to eval mode.
    data: inputs `[N, ...]` (a tensor), a pair `(inputs [N, ...], labels
      [N])`, a `torch.utils.data.Dataset` of inputs or `(input, label)`
      items, or a `DataLoader` (its own batches). Labels are recorded when
      present.
    batch_size: inputs per pass (not used for a DataLoader).
    device: "cpu", "cuda", "cuda:N" or a `torch.device`; default CUDA when
      available, else the CPU.
    signal: also record `Traces.signal`: "margin" or "entropy" (of each
      ramp's softmax, `jexit.signals.RECORDED`), a function `logits [B, C] ->
      [B]` applied at every ramp, or a list of K such functions (lower =
      more confident). Default: none (the policy bins 1 - conf).
    cost: "flops" (per input, `count_flops`) or "latency" (median ms per
      input at `latency_batch_size`, `measure_latency` with `warmup` and
      `repeats`, on the device, on the first inputs of `data`).
    progress: a tqdm bar over the batches (stderr).
    desc: the bar's label.

  Returns:
    `Traces` with conf `[N, K]`, pred `[N, K]`, label `[N]` (or None), cost
    `[K]` (segment + head), head_cost `[K]`, signal `[N, K]` (if asked) and
    position `[K]` (only when some position has several heads).

  Raises:
    ValueError: for a bad device, empty data, heads whose logits are not
      `[B, C]` or disagree on C, a signal of the wrong shape, or a bad option.
  """
  if cost not in COSTS:
    raise ValueError(f"cost: expected one of {list(COSTS)}, got {cost!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
  if (isinstance(latency_batch_size, bool) or not isinstance(latency_batch_size, int)
      or latency_batch_size < 1):
    raise ValueError(f"latency_batch_size: expected an int >= 1, got {latency_batch_size!r}")
  device = resolve_device(device)
  segments, groups = _groups(segments, heads)
  grouped = any(len(g) > 1 for g in groups)
  names = [_head_name(p, j, grouped) for p, g in enumerate(groups) for j in range(len(g))]
  position = np.asarray([p for p, g in enumerate(groups) for _ in g], np.int64)
  k_count = len(position)
  signal_name, signal_fns = _signal_fns(signal, k_count)
  _prepare(segments + [g for group in groups for g in group], device)

  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  conf, pred, labels, sig = [], [], [], []
  num_classes, example, has_labels = None, None, None
  bar = tqdm(_batches(data, batch_size), total=_num_batches(data, batch_size), desc=desc,
             disable=not progress, leave=False, unit="batch")
  for x, y in bar:
    if has_labels is None:
      has_labels = y is not None
    elif has_labels != (y is not None):
      raise ValueError("data: expected labels in every batch or in none")
    b = len(x)
    if b == 0:
      continue
    x = x.to(device)
    if example is None:
      example = x[:latency_batch_size]
    h, confs, preds, sigs, k = x, [], [], [], 0
    for segment, group in zip(segments, groups):
      h = segment(h)
      for head in group:
        logits = head(h)
        num_classes = _check_logits(names[k], logits, b, num_classes)
        c, p = max_softmax(logits)
        confs.append(c)
        preds.append(p)
        if signal_name is not None:
          z = logits if logits.dtype == torch.float64 else logits.float()
          sigs.append(signals.RECORDED[signal_name][1](z.softmax(-1), xp=torch))
        elif signal_fns is not None:
          v = signal_fns[k](logits)
          if not isinstance(v, torch.Tensor) or tuple(v.shape) != (b,):
            raise ValueError(f"signal: expected a [B={b}] tensor at ramp {k}, got "
                             f"{tuple(getattr(v, 'shape', ())) or type(v).__name__}")
          sigs.append(v)
        k += 1
    conf.append(torch.stack(confs, 1).cpu())
    pred.append(torch.stack(preds, 1).cpu())
    if sigs:  # a recorded signal in its softmax's dtype; the caller's in float64
      sig.append(torch.stack(sigs if signal_name is not None
                             else [s.to(torch.float64) for s in sigs], 1).cpu())
    if has_labels:
      if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"data: expected integer labels, got dtype {y.dtype}")
      labels.append(y.cpu())
  if example is None:
    raise ValueError("data: expected at least one input, got none")

  if cost == "flops":
    seg_cost, head_cost = count_flops(segments, groups, example[:1])
  else:
    reps = -(-latency_batch_size // len(example))
    batch = example.repeat(reps, *([1] * (example.ndim - 1)))[:latency_batch_size]
    seg_cost, head_cost = measure_latency(segments, groups, batch, warmup=warmup,
                                          repeats=repeats)
    seg_cost, head_cost = seg_cost / latency_batch_size, head_cost / latency_batch_size
  cost_k, head_k = _split_costs(seg_cost, head_cost, position)
  return check_traces(Traces(
      conf=torch.cat(conf).numpy().clip(0, 1),
      pred=torch.cat(pred).numpy(),
      label=torch.cat(labels).numpy() if has_labels else None,
      cost=cost_k,
      signal=torch.cat(sig).numpy() if sig else None,
      head_cost=head_k,
      position=position if grouped else None))
