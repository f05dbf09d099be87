"""Ramp placement: which candidate ramps (and heads) to deploy, per loss budget.

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

`place` enumerates the subsets, solves all of them x the lam grid in batched
`jexit.solve` calls (one per subset size by default, or one call for all,
subsets of fewer ramps padded in front with ramps that cost nothing and never
stop; either chunked by a memory budget: `solve_subsets`), replays
every policy on the fit and the held-out rows, and chooses the subset and lam
together on the fit rows (`jexit.select.choose_index`: the subset is one more
choice made on fit rows). With `delta`, the chosen subset's lam path is
certified on the held-out (calibration) rows as `jexit.select.choose` does.
It also scores, on the same rows, all candidates, evenly spaced subsets of
each size, Apparate-style greedy placement and any fixed subsets given.
"""

import itertools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from jexit import certify
from jexit.evaluation import Evaluation, _sweep_counts
from jexit.fit import fit_binning, loss_table, row_laws
from jexit.select import choose_index
from jexit.select_certify import _certified_split, _replay_outputs
from jexit.solver import solve, working_dtype
from jexit.traces import check_traces, signal_values, split_rows
from jexit.types import Binning, ExitModel, Policy, Traces, is_int_scalar, is_real_scalar

__all__ = ["Placement", "BudgetPlacement", "enumerate_subsets", "evenly_spaced",
           "head_costs", "place", "place_models", "subset_costs", "subset_model"]

SIGNALS = ("1-conf", "signal")  # per-ramp signals: a ramp's value ignores the others
NUM_LAMBDAS = 200
# 16 quantile bins per ramp: the batch is 2^(K-1) subsets, and the recall
# solver's work grows with S^3 (X ~ K S states, S x S moves).
NUM_BINS = 16
MAX_CANDIDATES = 16  # 2^15 subsets: beyond this, ask for max_ramps
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


def _check_ramps(name, ramps, k) -> Tuple[int, ...]:
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
  must = _check_ramps("must_include", must_include, k)
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
  name = _signal_name(traces, signal)
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


def _signal_name(traces, signal):
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


# ---------------------------------------------------------------- evaluation

class _Rows(NamedTuple):
  """One side's rows as every subset's replay reads them."""
  bins: np.ndarray     # [N, K]
  loss_in: np.ndarray  # [N, K] loss of each ramp's bin (solver dtype)
  agree: np.ndarray    # [N, K] int: ramp k agrees with the last ramp
  correct: np.ndarray  # [N, K] int: ramp k equals the label (zeros without labels)
  labels: bool


def _rows(traces: Traces, rows, pieces: Pieces, policy_loss_dtype) -> _Rows:
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
  return _Rows(bins, loss_in, agree, correct, labels)


def _path(side: _Rows, subset, recall: bool):
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


def subset_counts(policy: Policy, side: _Rows, subset):
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


# ------------------------------------------------------------------ results

class BudgetPlacement(NamedTuple):
  """The choices for one loss budget; each entry of `methods` is a dict with
  `active_ramps` (candidate indices), `lam`, `lam_index`, and `fit`/`test`
  metrics (`agreement`, `speedup`, `accuracy`, `mean_cost`, `stop_hist`
  over the candidate ramps), or `None` where nothing met the budget."""
  max_loss: float
  placed: Optional[dict]
  methods: Dict[str, Optional[dict]]
  certificate: Optional[object] = None
  uncertified: Optional[dict] = None


class Placement(NamedTuple):
  """What `place` found.

  Attributes:
    subsets: the candidate subsets placement chose among (sorted tuples).
    extra: subsets solved only for the comparisons.
    budgets: one `BudgetPlacement` per budget.
    fit_agreement, fit_speedup, test_agreement, test_speedup: `[M, L]` per
      subset (`subsets + extra`) and lam, on the fit / held-out rows;
      speedup = the backbone's cost (every segment and the last head) over
      the mean cost.
    lambdas: `[L]`.
    policies: per subset, its `Policy [L]`; models, binnings: per subset.
    split: the rows and settings (seed, block, test_fraction, counts).
    pieces: the shared fitted pieces.
    solve_calls: how many `jexit.solve` calls the batch took.
    timings: seconds per phase (fit, solve, evaluate).
  """
  subsets: List[Tuple[int, ...]]
  extra: List[Tuple[int, ...]]
  budgets: List[BudgetPlacement]
  fit_agreement: np.ndarray
  fit_speedup: np.ndarray
  test_agreement: np.ndarray
  test_speedup: np.ndarray
  lambdas: np.ndarray
  policies: list
  models: list
  binnings: list
  split: dict
  pieces: Pieces
  solve_calls: int
  timings: dict
  fit_accuracy: Optional[np.ndarray] = None
  test_accuracy: Optional[np.ndarray] = None
  position: Optional[np.ndarray] = None

  def index(self, subset) -> int:
    """The row of `subset` in the `[M, L]` arrays."""
    return (self.subsets + self.extra).index(tuple(subset))

  def frontier(self) -> List[dict]:
    """The frontier across subsets: the (subset, lam) points no other beats on
    the fit rows (agreement and speedup), with their held-out metrics."""
    from jexit.protocol import pareto_mask  # pylint: disable=import-outside-toplevel
    m = len(self.subsets)
    agr, spd = self.fit_agreement[:m].ravel(), self.fit_speedup[:m].ravel()
    keep = np.flatnonzero(pareto_mask(agr, 1.0 / spd))
    num_l = len(self.lambdas)
    out = [{"active_ramps": list(self.subsets[i // num_l]), "lam": float(self.lambdas[i % num_l]),
            "fit_agreement": float(agr[i]), "fit_speedup": float(spd[i]),
            "test_agreement": float(self.test_agreement[:m].ravel()[i]),
            "test_speedup": float(self.test_speedup[:m].ravel()[i])} for i in keep]
    return sorted(out, key=lambda p: -p["fit_agreement"])


def _flat_eval(agreement, speedup, accuracy=None) -> Evaluation:
  """An `Evaluation` carrying only what `choose_index` reads."""
  z = np.asarray(agreement).ravel()
  return Evaluation(param=np.arange(z.size), agreement=z,
                    accuracy=None if accuracy is None else np.asarray(accuracy).ravel(),
                    mean_cost=None, speedup=np.asarray(speedup).ravel(), stop_hist=None,
                    output_hist=None, p50_cost=None, p95_cost=None, p99_cost=None,
                    objective=None, num_inputs=0)


# --------------------------------------------------------------------- place

def _check_budgets(max_loss) -> List[float]:
  values = list(max_loss) if isinstance(max_loss, (list, tuple, np.ndarray)) else [max_loss]
  if not values:
    raise ValueError("max_loss: expected at least one budget, got none")
  for v in values:
    if not is_real_scalar(v) or not (np.isfinite(v) and 0 <= v <= 1):
      raise ValueError(f"max_loss: expected agreement-loss budgets in [0, 1], got {max_loss!r}")
  return [float(v) for v in values]


def place(traces: Traces, max_loss=0.01, *,
          max_ramps: Optional[int] = None,
          must_include: Sequence[int] = (),
          head_cost=None,
          block: int = 1,
          seed: int = 0,
          test_fraction: Optional[float] = None,
          delta: Optional[float] = None,
          calibration_share: Optional[float] = None,
          certify_test: Optional[str] = None,
          num_bins: int = NUM_BINS,
          num_lambdas: int = NUM_LAMBDAS,
          lambdas=None,
          signal: Optional[str] = None,
          recall: bool = True,
          fixed: Optional[Dict[str, Sequence[int]]] = None,
          compare: bool = True,
          max_bytes: int = DEFAULT_MAX_BYTES,
          by_size: bool = True) -> Placement:
  """Chooses, per loss budget on fit rows, which candidate ramps to deploy and the policy.

  Every deployable subset (`enumerate_subsets`) gets its model from shared
  pieces fitted on the fit rows (`place_models`, `subset_model`); all subsets
  x the lam grid are solved in batched `solve` calls (`solve_subsets`, chunks
  under `max_bytes`), replayed on fit and held-out rows, and per budget the
  (subset, lam) with the most fit speedup within the budget is chosen
  (`jexit.select.choose_index`). Speedups are against the backbone without
  exits (every segment and the last ramp's head), so subsets compare.

  Args:
    traces: candidate traces; `traces.head_cost` (or `head_cost`) says what
      each ramp's head costs; `traces.position` groups candidate heads.
    max_loss: an agreement-loss budget, or a list of them.
    max_ramps: deploy at most this many ramps (default: no limit).
    must_include: candidate ramps every subset keeps.
    head_cost: the heads' costs when the trace has none (a number or `[K]`).
    block, seed, test_fraction: the split (`jexit.traces.split_rows`;
      test_fraction default 0.5; with `delta` the held-out rows are the
      calibration rows, `calibration_share` of the blocks).
    delta, calibration_share, certify_test: certify the chosen subset's lam
      path on the held-out rows (`jexit.select.choose`'s rules).
    num_bins: quantile bins per ramp. num_lambdas, lambdas: the lam grid
      (default `placement_lambdas`).
    signal: `"1-conf"` or `"signal"` (default: the trace's own).
    recall: solve the recall policies (default) or the no-recall ones.
    fixed: named subsets to compare (e.g. the paper's three ramps).
    compare: also score all candidates, evenly spaced subsets of each size
      and Apparate-style greedy placement.
    max_bytes: solved thresholds per `solve` call, in bytes.
    by_size: one batched call per subset size (default), or one padded call
      for every subset (`solve_subsets`).

  Returns:
    A `Placement`.
  """
  import time  # pylint: disable=import-outside-toplevel
  budgets = _check_budgets(max_loss)
  traces = check_traces(traces)
  k = traces.num_ramps
  if k < 2:
    raise ValueError(f"traces.conf: expected at least 2 candidate ramps, got K={k}")
  h = head_costs(traces, head_cost)
  traces = traces._replace(head_cost=h)
  position = None if traces.position is None else np.asarray(traces.position)
  _signal_name(traces, signal)
  if k > MAX_CANDIDATES and max_ramps is None:
    raise ValueError(f"max_ramps: {k} candidates give 2^{k - 1} subsets; expected "
                     f"max_ramps with more than {MAX_CANDIDATES} candidates")
  subsets = enumerate_subsets(k, position=position, max_ramps=max_ramps,
                              must_include=must_include)
  fixed = {name: _check_ramps(f"fixed[{name!r}]", a, k) for name, a in (fixed or {}).items()}
  for name, a in fixed.items():
    if not a or a[-1] != k - 1:
      raise ValueError(f"fixed[{name!r}]: expected a subset that keeps the last ramp "
                       f"{k - 1}, got {list(a)}")
  if delta is None:
    if calibration_share is not None or certify_test is not None:
      raise ValueError("calibration_share, certify_test: only for a certified budget "
                       "(delta), got them with delta=None")
    test_fraction = 0.5 if test_fraction is None else test_fraction
  else:
    tests = set()
    for b in budgets:
      test, test_fraction_b = _certified_split(
          traces, b, delta, folds=None, test_fraction=test_fraction, block=block,
          calibration_share=calibration_share, certify_test=certify_test)
      tests.add((test, test_fraction_b))
    calibration_share = max(f for _, f in tests)  # one split for every budget
    test_fraction = calibration_share
  fit_r, test_r = split_rows(traces.num_inputs, test_fraction=test_fraction, seed=seed,
                             block=block)
  timings = {}
  start = time.perf_counter()
  pieces = place_models(traces, fit_r, num_bins=num_bins, signal=signal)
  extra = []
  if compare:
    pos_levels = len(set(position.tolist())) if position is not None else k
    wanted = [evenly_spaced(k, m, position) for m in range(1, pos_levels + 1)]
    wanted += list(fixed.values())
    extra = [a for a in dict.fromkeys(wanted) if a not in set(subsets)]
  else:
    extra = [a for a in dict.fromkeys(fixed.values()) if a not in set(subsets)]
  everyone = subsets + extra
  fitted = [subset_model(pieces, a) for a in everyone]
  models = [m for m, _ in fitted]
  lam = (placement_lambdas(pieces, everyone, num_lambdas) if lambdas is None
         else np.sort(np.asarray(lambdas, np.float64)))
  timings["fit_s"] = time.perf_counter() - start
  start = time.perf_counter()
  policies, calls = solve_subsets(models, lam, recall=recall, max_bytes=max_bytes,
                                  by_size=by_size)
  timings["solve_s"] = time.perf_counter() - start
  start = time.perf_counter()
  dtype = np.asarray(policies[0].loss).dtype
  sides = {"fit": _rows(traces, fit_r, pieces, dtype), "test": _rows(traces, test_r, pieces, dtype)}
  base = backbone_cost(traces.cost, h)
  num_l = len(lam)
  arrays = {f"{s}_{f}": np.zeros((len(everyone), num_l))
            for s in sides for f in ("agreement", "speedup", "accuracy")}
  for i, (a, pol, model) in enumerate(zip(everyone, policies, models)):
    for s, side in sides.items():
      stop, agree, correct = subset_counts(pol, side, a)
      n = side.bins.shape[0]
      mean_cost = stop @ np.cumsum(model.cost) / n
      arrays[f"{s}_agreement"][i] = agree / n
      arrays[f"{s}_speedup"][i] = base / mean_cost
      arrays[f"{s}_accuracy"][i] = correct / n
  timings["evaluate_s"] = time.perf_counter() - start
  labels = traces.label is not None
  split = {"seed": seed, "test_fraction": float(test_fraction), "block": int(block),
           "num_inputs": traces.num_inputs, "fit_rows": int(len(fit_r)),
           "test_rows": int(len(test_r)), "pareto": "chosen on fit rows",
           "metrics": "test rows"}
  result = Placement(
      subsets=subsets, extra=extra, budgets=[], fit_agreement=arrays["fit_agreement"],
      fit_speedup=arrays["fit_speedup"], test_agreement=arrays["test_agreement"],
      test_speedup=arrays["test_speedup"], lambdas=lam, policies=policies, models=models,
      binnings=[b for _, b in fitted], split=split, pieces=pieces, solve_calls=calls,
      timings=timings, fit_accuracy=arrays["fit_accuracy"] if labels else None,
      test_accuracy=arrays["test_accuracy"] if labels else None, position=position)
  ctx = dict(traces=traces, sides=sides, fit_rows=fit_r, test_rows=test_r, base=base,
             position=position, must=_check_ramps("must_include", must_include, k),
             max_ramps=max_ramps, block=block, seed=seed)
  out = []
  for b in budgets:
    start = time.perf_counter()
    out.append(_budget(result, b, ctx, compare=compare, fixed=fixed, delta=delta,
                       certify_test=certify_test))
    timings[f"choose_{b:g}_s"] = time.perf_counter() - start
  return result._replace(budgets=out)


def _entry(res: Placement, i: int, j: int, ctx) -> dict:
  """A subset's policy `j` with its fit and held-out metrics (candidate-indexed)."""
  a = (res.subsets + res.extra)[i]
  k = ctx["traces"].num_ramps
  out = {"active_ramps": [int(r) for r in a], "lam": float(res.lambdas[j]), "lam_index": int(j),
         "subset_index": int(i)}
  for s in ("fit", "test"):
    side = ctx["sides"][s]
    pol = res.policies[i]
    one = pol._replace(threshold=np.asarray(pol.threshold)[j:j + 1])
    stop, agree, correct = subset_counts(one, side, a)
    n = side.bins.shape[0]
    hist = np.zeros(k)
    hist[list(a)] = stop[0] / n
    mean_cost = float(stop[0] @ np.cumsum(res.models[i].cost) / n)
    out[s] = {"agreement": float(agree[0] / n), "speedup": ctx["base"] / mean_cost,
              "mean_cost": mean_cost, "stop_hist": hist.tolist(),
              "accuracy": float(correct[0] / n) if side.labels else None}
  return out


def _choose_in(res: Placement, rows: Sequence[int], max_loss: float, ctx) -> Optional[dict]:
  """The (subset, lam) with the most fit speedup within the budget among `rows`."""
  rows = list(rows)
  idx = choose_index(_flat_eval(res.fit_agreement[rows], res.fit_speedup[rows]), max_loss)
  if idx is None:
    return None
  num_l = len(res.lambdas)
  return _entry(res, rows[idx // num_l], idx % num_l, ctx)


def _greedy(res: Placement, max_loss: float, ctx) -> Optional[dict]:
  """Apparate-style placement: add the ramp of the best positive utility
  (exit rate x cost saved - share reaching it x its head's cost, under the
  subset's policy chosen on the fit rows), prune ramps of negative utility,
  until no addition pays. Only subsets of `res.subsets` are considered."""
  k = ctx["traces"].num_ramps
  known = {a: i for i, a in enumerate(res.subsets)}
  pos = np.arange(k) if ctx["position"] is None else ctx["position"]
  h = res.pieces.head_cost
  current = tuple(sorted(set(ctx["must"]) | {k - 1}))
  if current not in known:
    return None

  def chosen(a):
    return _choose_in(res, [known[a]], max_loss, ctx)

  def utilities(a, entry):
    hist = np.asarray(entry["fit"]["stop_hist"])
    cost = subset_costs(res.pieces.cost, h, a)
    cum = np.cumsum(cost)
    reach = 1.0 - np.concatenate([[0.0], np.cumsum(hist[list(a)])[:-1]])
    return {r: hist[r] * (cum[-1] - cum[j]) - reach[j] * h[r] for j, r in enumerate(a[:-1])}

  entry = chosen(current)
  seen = {current}
  while True:
    best, best_u, best_entry = None, 0.0, None
    for r in range(k - 1):
      if r in current or any(pos[q] == pos[r] for q in current):
        continue
      a = tuple(sorted(current + (r,)))
      if a not in known:
        continue
      e = chosen(a)
      if e is None:
        continue
      u = utilities(a, e)[r]
      if u > best_u + 1e-15:
        best, best_u, best_entry = a, u, e
    if best is None or best in seen:
      break
    current, entry = best, best_entry
    seen.add(current)
    while True:  # prune: the ramp of the most negative utility, one at a time
      u = utilities(current, entry)
      drop = [(v, r) for r, v in u.items() if v < 0 and r not in ctx["must"]]
      if not drop:
        break
      a = tuple(r for r in current if r != min(drop)[1])
      if a not in known or chosen(a) is None:
        break
      current, entry = a, chosen(a)
      seen.add(current)
  if entry is not None:
    entry = dict(entry, utilities={str(r): float(v) for r, v in utilities(current, entry).items()})
  return entry


def _certify(res: Placement, entry: dict, max_loss: float, delta: float, test: str, ctx):
  """Certifies the chosen subset's lam path (lam increasing) on the held-out
  rows: `(Certificate or Fallback, the certified entry or the backbone's)`."""
  from jexit.select_certify import PATH_CHUNK  # pylint: disable=import-outside-toplevel
  i = entry["subset_index"]
  a = (res.subsets + res.extra)[i]
  traces, rows, block = ctx["traces"], np.sort(ctx["test_rows"]), ctx["block"]
  sub = traces.take(rows)
  cols = sub._replace(conf=sub.conf[:, list(a)], pred=sub.pred[:, list(a)],
                      signal=None if sub.signal is None else sub.signal[:, list(a)])
  pred = np.asarray(sub.pred)
  final = pred[:, -1]
  starts = np.concatenate([[0], np.flatnonzero(np.diff(rows // block)) + 1])
  sizes = np.diff(np.concatenate([starts, [len(rows)]]))
  path = np.argsort(res.lambdas, kind="stable")
  parts = []
  for s in range(0, len(path), PATH_CHUNK):
    out = _replay_outputs(res.policies[i], path[s:s + PATH_CHUNK], cols, res.binnings[i])
    chosen_pred = np.take_along_axis(pred[:, list(a)], out.T, axis=1).T
    part = np.add.reduceat((chosen_pred != final[None]).astype(np.float64), starts,
                           axis=1) / sizes
    parts.append(part)
    if np.any(certify.unit_pvalues(part, max_loss, delta, test, seed=ctx["seed"]) > delta):
      break
  losses = np.concatenate(parts)
  cert = certify.certify_units(losses, max_loss, delta, test=test, index=path[:len(losses)],
                               rows=rows, block=block, seed=ctx["seed"])
  if isinstance(cert, certify.Certificate):
    return cert, _entry(res, i, cert.index, ctx)
  last = (res.subsets + res.extra).index((traces.num_ramps - 1,))
  return cert, _entry(res, last, 0, ctx)


def _budget(res: Placement, max_loss: float, ctx, *, compare, fixed, delta, certify_test):
  m = len(res.subsets)
  placed = _choose_in(res, range(m), max_loss, ctx)
  methods = {}
  k = ctx["traces"].num_ramps
  everyone = res.subsets + res.extra
  if compare:
    pos = ctx["position"]
    levels = k if pos is None else len(set(pos.tolist()))
    all_ramps = evenly_spaced(k, levels, pos)
    methods["all_ramps"] = _choose_in(res, [everyone.index(all_ramps)], max_loss, ctx)
    even = {}
    for size in range(1, levels + 1):
      a = evenly_spaced(k, size, pos)
      even[size] = _choose_in(res, [everyone.index(a)], max_loss, ctx)
    methods["evenly_spaced"] = {str(s): e for s, e in even.items()}
    rows = sorted({everyone.index(evenly_spaced(k, s, pos)) for s in even})
    methods["best_evenly_spaced"] = _choose_in(res, rows, max_loss, ctx)
    methods["greedy"] = _greedy(res, max_loss, ctx)
  for name, a in fixed.items():
    methods[name] = _choose_in(res, [everyone.index(a)], max_loss, ctx)
  cert = uncertified = None
  if delta is not None:
    uncertified = placed
    if placed is not None:
      units = len(np.unique(np.asarray(ctx["test_rows"]) // ctx["block"]))
      test = certify_test or _default_test(ctx["block"], units, max_loss, delta)
      cert, placed = _certify(res, placed, max_loss, delta, test, ctx)
  return BudgetPlacement(max_loss=max_loss, placed=placed, methods=methods, certificate=cert,
                         uncertified=uncertified)


def _default_test(block, units, max_loss, delta):
  from jexit.select_certify import default_certify_test  # pylint: disable=import-outside-toplevel
  return default_certify_test(block, units, max_loss, delta)


def placement_to_dict(res: Placement, trace: Optional[str] = None) -> dict:
  """JSON-ready summary: per budget the choice and the comparisons, the
  frontier across subsets, the split and the timings."""
  from jexit.report import certificate_to_dict  # pylint: disable=import-outside-toplevel
  cert = lambda c: certificate_to_dict(c, method="placement")
  return {
      "trace": trace, "num_candidates": int(res.pieces.cost.shape[0]),
      "num_subsets": len(res.subsets), "extra_subsets": [list(a) for a in res.extra],
      "num_lambdas": int(len(res.lambdas)), "solve_calls": int(res.solve_calls),
      "cost": res.pieces.cost.tolist(), "head_cost": res.pieces.head_cost.tolist(),
      "backbone_cost": backbone_cost(res.pieces.cost, res.pieces.head_cost),
      "split": res.split, "timings_s": {k: round(v, 3) for k, v in res.timings.items()},
      "budgets": [{"max_loss": b.max_loss, "placed": b.placed, "methods": b.methods,
                   "certificate": cert(b.certificate), "uncertified": b.uncertified}
                  for b in res.budgets],
      "frontier": res.frontier(),
  }


def format_placement(res: Placement, trace: Optional[str] = None) -> str:
  """A few lines per budget: the chosen ramps and the comparisons, held out."""
  k = int(res.pieces.cost.shape[0])
  lines = [f"ramp placement{'' if trace is None else ' on ' + trace}: {k} candidates, "
           f"{len(res.subsets)} subsets x {len(res.lambdas)} lam in {res.solve_calls} solve "
           f"call(s) ({res.timings.get('solve_s', 0):.1f} s); fit {res.split['fit_rows']} rows, "
           f"held out {res.split['test_rows']} (block {res.split['block']})",
           "speedup: backbone cost / mean cost; chosen on fit rows, reported on held-out rows"]
  show = lambda e: ("nothing met the budget on the fit rows" if e is None else
                    f"test speedup {e['test']['speedup']:.3f}x, agreement loss "
                    f"{1 - e['test']['agreement']:.4f} (fit {1 - e['fit']['agreement']:.4f}), "
                    f"ramps {e['active_ramps']}")
  for b in res.budgets:
    lines.append(f"budget {b.max_loss:g}:")
    lines.append(f"  placed             {show(b.placed)}")
    if b.certificate is not None:
      c = b.certificate
      lines.append("  " + (f"certified: Pr(disagreement > {c.eps:g}) <= {c.delta:g} "
                           f"({c.test}, {c.units} units; ucb {c.ucb:.4g})"
                           if isinstance(c, certify.Certificate) else
                           f"not certified ({c.units} units; need {c.needed_units}): the "
                           f"backbone ships"))
    for name, e in b.methods.items():
      if name == "evenly_spaced":
        size = None if b.placed is None else len(b.placed["active_ramps"])
        if size is not None and str(size) in e:
          lines.append(f"  {'evenly spaced, ' + str(size):18} {show(e[str(size)])}")
        continue
      lines.append(f"  {name.replace('_', ' '):18} {show(e)}")
  return "\n".join(lines)


def plot_placement(res: Placement, path: str, trace: Optional[str] = None) -> str:
  """Held-out agreement loss vs speedup: the frontier across subsets (chosen on
  fit rows) against all candidate ramps' lam grid; the per-budget choices marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  front = res.frontier()
  ax.plot([1 - p["test_agreement"] for p in front], [p["test_speedup"] for p in front],
          ".-", ms=3, lw=1, label="frontier across subsets (fit-Pareto)")
  k = int(res.pieces.cost.shape[0])
  pos = res.position
  levels = k if pos is None else len(set(pos.tolist()))
  try:
    i = res.index(evenly_spaced(k, levels, pos))
    order = np.argsort(res.lambdas)
    ax.plot(1 - res.test_agreement[i][order], res.test_speedup[i][order], "-", lw=1,
            label="all candidate ramps")
  except ValueError:
    pass
  for b in res.budgets:
    if b.placed is not None:
      ax.plot(1 - b.placed["test"]["agreement"], b.placed["test"]["speedup"], "k*", ms=9)
      ax.annotate(f"{b.max_loss:g}: {b.placed['active_ramps']}",
                  (1 - b.placed["test"]["agreement"], b.placed["test"]["speedup"]),
                  fontsize=7, xytext=(4, -10), textcoords="offset points")
  ax.set_xscale("symlog", linthresh=1e-3)
  ax.set_xlim(0, 0.2)
  ax.set_xlabel("held-out agreement loss")
  ax.set_ylabel("held-out speedup (backbone cost / mean cost)")
  ax.set_title(f"ramp placement{'' if trace is None else ': ' + trace}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def export_placement(path, res: Placement, budget: BudgetPlacement, traces: Traces) -> dict:
  """Writes the chosen subset's table of `budget` (`jexit.export.export_policy`),
  its header listing `active_ramps`."""
  from jexit.export import export_policy  # pylint: disable=import-outside-toplevel
  e = budget.placed
  if e is None:
    raise ValueError(f"max_loss: nothing met the budget {budget.max_loss:g} on the fit rows; "
                     f"no table to write")
  i = e["subset_index"]
  from jexit.report import certificate_to_dict  # pylint: disable=import-outside-toplevel
  cert = certificate_to_dict(budget.certificate, method="placement")
  return export_policy(path, res.policies[i], res.binnings[i], res.models[i], e["lam_index"],
                       traces=traces, budget={"max_loss": budget.max_loss,
                                              "metric": "agreement"},
                       certificate=cert, active_ramps=e["active_ramps"])

