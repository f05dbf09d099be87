"""Candidate subsets of ramps: their costs, exit models, batched solve and replay.

A trace may record more candidate ramps than will be deployed (PROBLEM.md,
"Ramp placement"). Ramp k's cost splits into its backbone segment and its head,
`cost[k] = segment[k] + head_cost[k]`. Deploying a subset A of the K candidates
(the last ramp always in A; at most one head per `position`) gives a K_A-ramp
model whose ramp j costs the segments since the previous ramp of A plus its own
head:

    cost_A[j] = sum_{k in (A[j-1], A[j]]} segment[k] + head_cost[A[j]]

Its exit model is built from pieces shared by every subset, all fitted on the
fit rows: per-ramp bins and loss tables (both fitted per column, so a subset's
are the candidates' own), the law of the bin at each ramp, and the
transitions `a -> b` between every pair of ramps, counted directly from the
rows (not composed from one-step matrices). A subset's model is exactly what
`jexit.fit` gives on the trace restricted to its columns (tests check it).

`solve_subsets` solves many subsets x a lam grid in batched `jexit.solve`
calls; `subset_counts` replays a subset's lam grid on rows. `jexit.place`
chooses among the subsets.
"""

import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from jexit.evaluation import _sweep_counts
from jexit.fit import fit_binning, loss_table, row_laws
from jexit.solver import solve, working_dtype
from jexit.traces import check_traces, signal_values
from jexit.types import Binning, ExitModel, Policy, Traces, is_int_scalar

__all__ = ["Pieces", "Side", "backbone_cost", "check_ramps", "enumerate_subsets",
           "evenly_spaced", "head_costs", "place_models", "placement_lambdas", "side_rows",
           "signal_name", "solve_subsets", "subset_costs", "subset_counts", "subset_model"]

SIGNALS = ("1-conf", "signal")  # per-ramp signals: a ramp's value ignores the others
NUM_LAMBDAS = 200
# 16 quantile bins per ramp: the batch is 2^(K-1) subsets, and the recall
# solver's work grows with S^3 (X ~ K S states, S x S moves).
NUM_BINS = 16
DEFAULT_MAX_BYTES = 1 << 29  # solved thresholds held at once, per solve call

# ------------------------------------------------------------------- subsets

def head_costs(traces: Traces, head_cost=None) -> np.ndarray:
  """`[K]` the heads' part of each ramp's cost: `head_cost` if given (a number
  for every ramp, or `[K]`), else `traces.head_cost`.

  Raises:
    ValueError: when neither is there, or `head_cost` is not in `[0, cost[k]]`.
  """
  cost = np.asarray(traces.cost, np.float64)
  k = cost.shape[0]
  if head_cost is None:
    if traces.head_cost is None:
      raise ValueError("traces.head_cost: ramp placement needs each ramp's head cost (the "
                       "part of cost[k] spent in its head; jexit record writes it), got a "
                       "trace without one; pass head_cost= (CLI: --head-cost)")
    return np.asarray(traces.head_cost, np.float64)
  h = np.asarray(head_cost)
  if h.dtype.kind not in "iuf" or h.ndim > 1:
    raise ValueError(f"head_cost: expected a number or [K={k}] numbers, got {head_cost!r}")
  h = np.broadcast_to(h.astype(np.float64), (k,)) if h.ndim == 0 else h.astype(np.float64)
  if h.shape != (k,) or not np.all(np.isfinite(h)) or np.any(h < 0) or np.any(h > cost):
    raise ValueError(f"head_cost: expected [K={k}] values in [0, cost[k]] (cost "
                     f"{cost.tolist()}), got {np.asarray(head_cost).tolist()}")
  return h.copy()


def subset_costs(cost, head_cost, subset) -> np.ndarray:
  """`[K_A]` the cost of each ramp of `subset` (PROBLEM.md, "Ramp placement"):
  the segments since the previous ramp of the subset, plus its own head."""
  cost = np.asarray(cost, np.float64)
  segment = cost - np.asarray(head_cost, np.float64)
  cum = np.concatenate([[0.0], np.cumsum(segment)])  # cum[k + 1]: segments 0..k
  a = np.asarray(subset, np.int64)
  prev = np.concatenate([[-1], a[:-1]])
  return cum[a + 1] - cum[prev + 1] + np.asarray(head_cost, np.float64)[a]


def backbone_cost(cost, head_cost) -> float:
  """The network without early exits: every segment and the last ramp's head."""
  return float(subset_costs(cost, head_cost, [len(cost) - 1])[0])


def check_ramps(name, ramps, k) -> Tuple[int, ...]:
  """`ramps` as sorted distinct 0-based candidate indices in `[0, k)`; a
  ValueError naming `name` otherwise."""
  out = []
  for r in ramps:
    if not is_int_scalar(r) or not 0 <= r < k:
      raise ValueError(f"{name}: expected 0-based candidate ramps in [0, {k}), got "
                       f"{list(ramps)!r}")
    out.append(int(r))
  return tuple(sorted(set(out)))


def enumerate_subsets(num_ramps: int, *, position=None, max_ramps: Optional[int] = None,
                      must_include: Sequence[int] = ()) -> List[Tuple[int, ...]]:
  """Every deployable subset of `num_ramps` candidates, as sorted tuples.

  A deployable subset keeps the last ramp, takes at most one head per
  `position` (`[K]`, nondecreasing; None: one ramp per position), holds every
  ramp of `must_include`, and at most `max_ramps` ramps. With distinct
  positions and no limit there are `2^(K-1)`; ordered by size, then
  lexicographically.
  """
  k = int(num_ramps)
  if k < 1:
    raise ValueError(f"num_ramps: expected >= 1, got {num_ramps!r}")
  pos = np.arange(k) if position is None else np.asarray(position, np.int64)
  must = check_ramps("must_include", must_include, k)
  if len(set(pos[list(must)].tolist())) != len(must):
    raise ValueError(f"must_include: expected at most one ramp per position, got "
                     f"{list(must)} at positions {pos[list(must)].tolist()}")
  if any(pos[m] == pos[k - 1] and m != k - 1 for m in must):
    raise ValueError(f"must_include: ramp(s) {list(must)} share the last ramp's position; "
                     f"the last ramp is always deployed")
  if max_ramps is not None and (not is_int_scalar(max_ramps) or max_ramps < 1):
    raise ValueError(f"max_ramps: expected an integer >= 1, got {max_ramps!r}")
  fixed = set(must) | {k - 1}
  if max_ramps is not None and len(fixed) > max_ramps:
    raise ValueError(f"max_ramps: expected at least {len(fixed)} (the last ramp and "
                     f"must_include {list(must)}), got {max_ramps}")
  taken = {int(pos[r]) for r in fixed}
  # Per free position, the heads that may sit there (or none).
  free = [[r for r in range(k - 1) if pos[r] == p]
          for p in sorted(set(pos[:k - 1].tolist()) - taken)]
  limit = (len(free) if max_ramps is None else max_ramps - len(fixed))
  out = []
  for size in range(0, min(limit, len(free)) + 1):
    for group in itertools.combinations(range(len(free)), size):
      for heads in itertools.product(*(free[g] for g in group)):
        out.append(tuple(sorted(fixed | set(heads))))
  return sorted(set(out), key=lambda a: (len(a), a))


def evenly_spaced(num_ramps: int, size: int, position=None) -> Tuple[int, ...]:
  """The subset of `size` ramps evenly spaced along the candidate positions,
  ending with the last ramp (the last head at each chosen position)."""
  k = int(num_ramps)
  pos = np.arange(k) if position is None else np.asarray(position, np.int64)
  levels = sorted(set(pos.tolist()))
  size = min(int(size), len(levels))
  picks = [levels[int(round((j + 1) * len(levels) / size)) - 1] for j in range(size)]
  return tuple(int(np.flatnonzero(pos == p)[-1]) for p in sorted(set(picks)))


# -------------------------------------------------------------------- models

class Pieces(NamedTuple):
  """What every subset's model is built from (fitted on the fit rows).

  Attributes:
    binning: per-ramp bins `edges [K, S+1]` of the signal.
    loss: `[K, S]` per-ramp loss tables.
    first: `[K, S]` counts of the fit rows' bin at each ramp.
    pair: `[K, K, S, S]` counts of moves from bin a at ramp i to bin b at ramp
      j (for i < j; zero elsewhere).
    cost, head_cost: `[K]`.
    smoothing: additive count per cell (as `jexit.fit`'s).
  """
  binning: Binning
  loss: np.ndarray
  first: np.ndarray
  pair: np.ndarray
  cost: np.ndarray
  head_cost: np.ndarray
  smoothing: float


def place_models(traces: Traces, rows=None, *, head_cost=None, num_bins: int = NUM_BINS,
                 signal: Optional[str] = None, smoothing: float = 1.0,
                 loss: str = "logistic") -> Pieces:
  """The shared pieces of every subset's model, fitted on `rows` (default all)."""
  traces = check_traces(traces)
  h = head_costs(traces, head_cost)
  name = signal_name(traces, signal)
  fit_t = traces if rows is None else traces.take(np.asarray(rows))
  binning, values = fit_binning(fit_t, num_bins=num_bins, signal=name)
  b = binning.assign(values)
  s = binning.num_bins
  k = traces.num_ramps
  table = loss_table(fit_t, values, b, binning.edges, loss=loss, target="agreement")
  first = np.stack([np.bincount(b[:, r], minlength=s) for r in range(k)]).astype(np.float64)
  pair = np.zeros((k, k, s, s))
  for i in range(k):
    for j in range(i + 1, k):
      np.add.at(pair[i, j], (b[:, i], b[:, j]), 1.0)
  return Pieces(binning, table, first, pair, np.asarray(traces.cost, np.float64), h,
                float(smoothing))


def subset_model(pieces: Pieces, subset) -> Tuple[ExitModel, Binning]:
  """The `ExitModel` and `Binning` of a subset of candidate ramps."""
  a = list(subset)
  sm = pieces.smoothing
  init = pieces.first[a[0]] + sm
  init = init / init.sum()
  s = pieces.loss.shape[1]
  trans = (row_laws(np.stack([pieces.pair[i, j] for i, j in zip(a[:-1], a[1:])]) + sm)
           if len(a) > 1 else np.zeros((0, s, s)))
  model = ExitModel(init=init, trans=trans, loss=pieces.loss[a].copy(),
                    cost=subset_costs(pieces.cost, pieces.head_cost, a))
  binning = pieces.binning._replace(edges=pieces.binning.edges[a].copy())
  return model, binning


def signal_name(traces, signal) -> str:
  """The per-ramp signal placement bins: `signal`, else the trace's own, else
  "1-conf"; a ValueError for a signal that reads the previous ramp."""
  name = signal or ("signal" if traces.signal is not None else "1-conf")
  if name not in SIGNALS:
    raise ValueError(f"signal: ramp placement bins a per-ramp signal, one of "
                     f"{list(SIGNALS)} (a signal that reads the previous ramp changes "
                     f"with the subset), got {name!r}")
  if name == "signal" and traces.signal is None:
    raise ValueError("signal: 'signal' needs traces.signal, which is None")
  return name


# ------------------------------------------------------------- batched solve

def _padded_batch(models: Sequence[ExitModel], big: float) -> ExitModel:
  """`[M]` models of the largest K among them: a model of fewer ramps gets
  ramps in front that cost nothing, keep the bin (identity moves) and whose
  loss `big` never stops nor becomes the best so far."""
  k = max(m.loss.shape[0] for m in models)
  s = models[0].loss.shape[1]
  eye = np.eye(s)
  out = []
  for m in models:
    d = k - m.loss.shape[0]
    out.append(ExitModel(
        init=m.init,
        trans=np.concatenate([np.broadcast_to(eye, (d, s, s)), m.trans]) if d else m.trans,
        loss=np.concatenate([np.full((d, s), big), m.loss]),
        cost=np.concatenate([np.zeros(d), m.cost])))
  return ExitModel(*(np.stack(f) for f in zip(*out)))


def solve_subsets(models: Sequence[ExitModel], lambdas, *, recall: bool = True,
                  max_bytes: int = DEFAULT_MAX_BYTES,
                  by_size: bool = True) -> Tuple[List[Policy], int]:
  """Solves every subset model for every lam: `([Policy [L]] per model, calls)`.

  With `by_size` (default), the subsets of each size go to `jexit.solve` as
  one `[M]` batch (no padding); else all of them as one batch, padded to the
  largest K (`_padded_batch`). Either way a batch is split into as few calls
  as keep the solved thresholds under `max_bytes`. Padding costs more than it
  saves on a CPU: the padded ramps and the recall state's larger X (about
  K S distinct losses) multiply the work, while a call per size costs a few
  milliseconds (benchmarks/PLACE.md measured both against a loop).
  """
  lam = np.asarray(lambdas, np.float64)
  s = models[0].loss.shape[1]
  real = np.concatenate([np.ravel(m.loss) for m in models])
  total = max(float(np.sum(m.cost)) for m in models)
  # Above any continuation value: lam * (all costs) + the largest loss.
  big = float(np.float32(4.0 * (1.0 + abs(real).max() + lam.max() * total)))
  itemsize = np.dtype(working_dtype()).itemsize
  order = sorted(range(len(models)), key=lambda i: models[i].loss.shape[0])
  chunks, current, k_max = [], [], 0
  for i in order:
    k_i = max(k_max, models[i].loss.shape[0])
    new_size = by_size and current and models[i].loss.shape[0] != k_max
    if current and (new_size or (len(current) + 1) * len(lam) * k_i * s * itemsize > max_bytes):
      chunks.append(current)
      current, k_i = [], models[i].loss.shape[0]
    current.append(i)
    k_max = k_i
  chunks.append(current)
  out = [None] * len(models)
  for chunk in chunks:
    batch = _padded_batch([models[i] for i in chunk], big)
    pol = solve(batch, lam, recall=recall)
    thr, value = np.asarray(pol.threshold), np.asarray(pol.value)
    loss = np.asarray(pol.loss)
    k_pad = thr.shape[2]
    for j, i in enumerate(chunk):
      d = k_pad - models[i].loss.shape[0]
      out[i] = Policy(threshold=thr[j, :, d:], value=value[j], lam=np.asarray(pol.lam)[j],
                      loss=loss[j, d:], cost=np.asarray(pol.cost)[j, d:], recall=recall)
  return out, len(chunks)


def placement_lambdas(pieces: Pieces, subsets, num: int = NUM_LAMBDAS) -> np.ndarray:
  """`[num]` log-spaced lam over the range where the subsets' policies change
  (`jexit.protocol.default_lambdas`' rule over every subset's costs)."""
  if not is_int_scalar(num) or num < 1:
    raise ValueError(f"num_lambdas: expected an integer >= 1, got {num!r}")
  spread = float(pieces.loss.max() - pieces.loss.min()) or 1.0
  costs = np.concatenate([subset_costs(pieces.cost, pieces.head_cost, a) for a in subsets])
  pos = costs[costs > 0]
  total = backbone_cost(pieces.cost, pieces.head_cost)
  return np.geomspace(1e-4 * spread / total, 2.0 * spread / pos.min(), num)


# -------------------------------------------------------------------- replay

class Side(NamedTuple):
  """One side's rows as every subset's replay reads them."""
  bins: np.ndarray     # [N, K]
  loss_in: np.ndarray  # [N, K] loss of each ramp's bin (solver dtype)
  agree: np.ndarray    # [N, K] int: ramp k agrees with the last ramp
  correct: np.ndarray  # [N, K] int: ramp k equals the label (zeros without labels)
  labels: bool


def side_rows(traces: Traces, rows, pieces: Pieces, policy_loss_dtype) -> Side:
  """`rows` of `traces` binned with `pieces`, as `subset_counts` replays them."""
  t = traces.take(np.asarray(rows))
  values = signal_values(t, pieces.binning.signal)
  bins = pieces.binning.assign(values)
  k = bins.shape[1]
  loss = pieces.loss.astype(policy_loss_dtype)
  loss_in = loss[np.arange(k)[None, :], bins]
  agree = (t.pred == t.pred[:, -1:]).astype(np.int64)
  labels = t.label is not None
  correct = ((t.pred == t.label[:, None]).astype(np.int64) if labels
             else np.zeros_like(agree))
  return Side(bins, loss_in, agree, correct, labels)


def _path(side: Side, subset, recall: bool):
  a = list(subset)
  loss_in = side.loss_in[:, a]
  if recall:
    best = np.minimum.accumulate(loss_in, axis=1)
    best_ramp = np.zeros(loss_in.shape, np.int64)
    for r in range(1, len(a)):
      best_ramp[:, r] = np.where(loss_in[:, r] <= best[:, r - 1], r, best_ramp[:, r - 1])
  else:
    best, best_ramp = loss_in, np.broadcast_to(np.arange(len(a)), loss_in.shape).copy()
  return side.bins[:, a], best, best_ramp, loss_in


def subset_counts(policy: Policy, side: Side, subset):
  """`(stop_count [L, K_A], agree [L], correct [L])` of a subset's lam grid
  replayed on one side's rows (the decision rule of `jexit.evaluation`)."""
  thr = np.asarray(policy.threshold)
  bins, best, best_ramp, loss_in = _path(side, subset, policy.recall)
  a = list(subset)
  n = bins.shape[0]
  if np.all(thr[1:] >= thr[:-1]):
    stop, _, agree, correct, _ = _sweep_counts(thr, bins, best, best_ramp, loss_in,
                                               side.agree[:, a], side.correct[:, a],
                                               np.ones(n, np.int64))
    return stop, agree, correct
  stop_ramp, out_ramp = _replay(thr, bins, best, best_ramp)
  k = len(a)
  stop = np.stack([np.bincount(r, minlength=k) for r in stop_ramp])
  take = lambda w: np.take_along_axis(w[:, a][None].repeat(len(thr), 0),
                                      out_ramp[..., None], axis=2)[..., 0].sum(1)
  return stop, take(side.agree), take(side.correct)


def _replay(thr, bins, best, best_ramp):
  """`(stop_ramp, output_ramp)` `[L, N]` by direct replay (any thresholds)."""
  k = bins.shape[1]
  t = thr[:, np.arange(k)[None, :], bins]  # [L, N, K]
  stop = best[None] <= t
  stop[..., -1] = True
  stop_ramp = np.argmax(stop, axis=-1)
  return stop_ramp, np.take_along_axis(best_ramp[None].repeat(len(thr), 0),
                                       stop_ramp[..., None], axis=2)[..., 0]

