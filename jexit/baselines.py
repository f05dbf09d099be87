"""Baseline exit rules that jexit's policies are read against.

Every baseline returns the same `Evaluation` as `jexit.evaluation`, over a
batch `[P]` of its parameter values, so the frontier, the budget search and
the plots treat all methods alike. The no-recall optimum is not here: it is
`jexit.solve(..., recall=False)` evaluated with `jexit.evaluation`.

Confidence rules (the global threshold, Apparate) exit at the first ramp k
with `1 - conf[k] < t_k` (strict, as Apparate does) and always at the last.
"""

from typing import Optional, Sequence

import numpy as np

from jexit.checks import check_bytes
from jexit.metrics import Evaluation, from_counts, summarize
from jexit.traces import check_traces
from jexit.types import Binning, Policy, Traces

APPARATE_STEPS = (0.0125, 0.025, 0.05)  # initial steps tried (threshold_tuner.py)
APPARATE_MIN_STEP = 0.0125


def _uncertainty(traces: Traces) -> np.ndarray:
  return 1.0 - np.asarray(traces.conf, np.float64)


def _check_batch(option: str, rows: int, traces: Traces, per_cell: int) -> None:
  """Refuses `[rows, N, K]` working arrays (`per_cell` bytes per entry, with
  the `[rows, N]` results) that the host cannot hold, naming the option."""
  n, k = traces.conf.shape
  check_bytes(option, None, f"{rows} rows x {n} inputs x {k} ramps of decisions",
              rows * n * (k * per_cell + 4 * 8), hint=f"pass fewer {option}")


def first_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """`[P, N]` first ramp k with `values[n, k] < thresholds[p, k]`, else the last.

  Args:
    values: `[N, K]` per-input signal (lower = more confident).
    thresholds: `[P, K]` per-ramp thresholds (the last ramp's is ignored).
  """
  values = np.asarray(values, np.float64)
  thresholds = np.asarray(thresholds, np.float64)
  k = values.shape[1]
  below = values[None, :, :-1] < thresholds[:, None, :k - 1]  # [P, N, K-1]
  any_below = below.any(axis=2)
  return np.where(any_below, np.argmax(below, axis=2), k - 1)


def threshold_policy(thresholds: Sequence[float], cost: Sequence[float]):
  """Per-ramp confidence thresholds as a jexit table, to export and deploy.

  The rule "exit at the first ramp k with `1 - conf[k] < t_k`" (global
  threshold, Apparate) is a no-recall policy over 2 bins per ramp: bin 0 is
  `1 - conf < t_k` (edges `[lo, t_k, hi]`; bins are `[e_s, e_{s+1})`) with
  loss 0, bin 1 the rest with loss 1, threshold 0 (the last ramp +inf).
  `jexit.evaluate`, `jexit.runtime.ExitTable` and the torch runner then make
  the rule's decisions exactly.

  Args:
    thresholds: `[K]` per-ramp thresholds (the last ramp's is ignored), or one
      value for every ramp (the global threshold) with `cost` giving K.
    cost: `[K]` segment costs (the traces' `cost`).

  Returns:
    `(Policy [L = 1], Binning)`; `policy.lam` is 0 and `policy.value` NaN
    (no model was solved).
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 1 or cost.size < 1 or not np.all(np.isfinite(cost)) or np.any(cost < 0):
    raise ValueError(f"cost: expected [K] finite values >= 0, got {cost.tolist()}")
  k = cost.size
  t = np.asarray(thresholds, np.float64)
  if t.ndim == 0:
    t = np.full(k, float(t))
  if t.shape != (k,) or not np.all(np.isfinite(t[:-1])):
    raise ValueError(f"thresholds: expected one finite value or [K={k}] finite values "
                     f"(the last may be anything), got {np.asarray(thresholds).tolist()}")
  t = np.where(np.arange(k) == k - 1, 0.5, t)  # the last ramp always exits
  edges = np.stack([np.minimum(t, 0.0) - 1.0, t, np.maximum(t, 1.0) + 1.0], axis=1)
  loss = np.tile(np.array([0.0, 1.0], np.float32), (k, 1))
  threshold = np.zeros((1, k, 2), np.float32)
  threshold[0, -1] = np.inf
  policy = Policy(threshold=threshold, value=np.array([np.nan], np.float32),
                  lam=np.zeros(1, np.float32), loss=loss, cost=cost.astype(np.float32),
                  recall=False)
  return policy, Binning(edges=edges, signal="1-conf")


def backbone_policy(cost: Sequence[float]):
  """The backbone as a jexit table: it never exits before the last ramp.

  One bin per ramp (edges `[-1, 2]`, which hold every `1 - conf`), loss 0,
  threshold -inf at every ramp but the last (+inf): what a certified budget
  ships when nothing can be certified.

  Returns:
    `(Policy [L = 1], Binning)`; `policy.lam` is 0 and `policy.value` NaN.
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 1 or cost.size < 1 or not np.all(np.isfinite(cost)) or np.any(cost < 0):
    raise ValueError(f"cost: expected [K] finite values >= 0, got {cost.tolist()}")
  k = cost.size
  threshold = np.full((1, k, 1), -np.inf, np.float32)
  threshold[0, -1] = np.inf
  policy = Policy(threshold=threshold, value=np.array([np.nan], np.float32),
                  lam=np.zeros(1, np.float32), loss=np.zeros((k, 1), np.float32),
                  cost=cost.astype(np.float32), recall=False)
  return policy, Binning(edges=np.tile([-1.0, 2.0], (k, 1)), signal="1-conf")


def threshold_rule(traces: Traces, thresholds: np.ndarray, *, param=None,
                   return_per_input: bool = False) -> Evaluation:
  """Per-ramp confidence thresholds: exit at the first k with `1 - conf < t_k`.

  Args:
    traces: the traces.
    thresholds: `[P, K]` (or `[K]`) per-ramp thresholds; the last ramp always
      exits.
    param: `[P]` labels of the rows (default: row index).

  Returns:
    An `Evaluation` over the `[P]` rows.
  """
  traces = check_traces(traces)
  thresholds = np.atleast_2d(np.asarray(thresholds, np.float64))
  k = traces.num_ramps
  if thresholds.ndim != 2 or thresholds.shape[1] != k or np.any(np.isnan(thresholds)):
    raise ValueError(f"thresholds: expected shape [P, K={k}] without NaN, got "
                     f"{thresholds.shape}")
  _check_batch("thresholds", len(thresholds), traces, 1)
  stop = first_below(_uncertainty(traces), thresholds)
  param = np.arange(len(thresholds)) if param is None else np.asarray(param)
  return summarize(stop, stop, traces, param=param, return_per_input=return_per_input)


def default_threshold_grid(traces: Traces, num: int = 256) -> np.ndarray:
  """`[T]` candidate global thresholds: quantiles of `1 - conf` over the early ramps.

  Starts at 0 (never exit early) and ends above every value (always exit at
  ramp 1); in between, quantiles plus a log grid, since the informative
  thresholds of confident networks are tiny (`1 - conf` of 1e-4).
  """
  traces = check_traces(traces)
  u = _uncertainty(traces)[:, :-1].ravel()
  grid = [np.zeros(1), np.geomspace(1e-6, 1.0, num // 4)]
  if u.size:
    grid.append(np.quantile(u, np.linspace(0, 1, num)))
    # Strict `<`: a threshold just above a value admits it.
    grid.append(np.nextafter(np.quantile(u, np.linspace(0, 1, num)), np.inf))
    grid.append([np.nextafter(u.max(), np.inf)])
  return np.unique(np.concatenate(grid))


def global_threshold(traces: Traces, thresholds: Optional[Sequence[float]] = None, *,
                     return_per_input: bool = False) -> Evaluation:
  """One confidence threshold t for all ramps (BranchyNet / DeeBERT style).

  Exits at the first ramp with `1 - conf < t`; `param` is t.
  """
  traces = check_traces(traces)
  t = default_threshold_grid(traces) if thresholds is None else np.asarray(thresholds,
                                                                            np.float64)
  if t.ndim != 1 or t.size == 0 or np.any(np.isnan(t)):
    raise ValueError(f"thresholds: expected a non-empty [T] array without NaN, got {t.shape}")
  n, k = traces.conf.shape
  # With m_j = min(u_0..u_j) (nonincreasing in j), an input has exited by ramp
  # j iff m_j < t: every count is a sorted search over the inputs, O((N + T) log N).
  prefix = np.minimum.accumulate(_uncertainty(traces)[:, :-1], axis=1)  # [N, K-1]
  if return_per_input:
    _check_batch("thresholds", len(t), traces, 1)
    stop = np.minimum((prefix[None, :, :] >= t[:, None, None]).sum(axis=2), k - 1)
    return summarize(stop, stop, traces, param=t, return_per_input=True)

  def below(j, mask):  # [T] inputs in `mask` that exited by ramp j (none for j < 0)
    if j < 0:
      return np.zeros(len(t), np.int64)
    return np.searchsorted(np.sort(prefix[mask, j]), t, side="left")

  everyone = np.ones(n, bool)
  done = np.stack([below(j, everyone) for j in range(k - 1)] + [np.full(len(t), n)], axis=1)
  stop_count = np.diff(done, axis=1, prepend=0)  # [T, K]

  def hits(ok):  # [T] inputs whose exit ramp has ok[n, ramp]
    total = np.zeros(len(t), np.int64)
    for j in range(k - 1):
      total += below(j, ok[:, j]) - below(j - 1, ok[:, j])
    return total + ok[:, -1].sum() - below(k - 2, ok[:, -1])

  agree = hits(traces.pred == traces.pred[:, -1:])
  correct = None if traces.label is None else hits(traces.pred == traces.label[:, None])
  return from_counts(t, stop_count, stop_count, agree, correct, traces.cost, n)


def apparate_greedy(traces: Traces, max_loss=0.01, *,
                    steps: Sequence[float] = APPARATE_STEPS,
                    min_step: float = APPARATE_MIN_STEP,
                    max_rounds: int = 100_000) -> np.ndarray:
  """Per-ramp thresholds by Apparate's greedy search (SOSP '24, threshold_tuner.py).

  For each initial step s in `steps`: all thresholds start at 0, every step
  at s. Each round tries raising each ramp's threshold (those still <= 1) by
  its step (rounded to 4 decimals, as Apparate does). Among feasible moves
  (agreement loss `1 - agreement <= max_loss`) that save cost, it keeps the
  one that loses least agreement per unit of cost saved (the first on ties);
  a feasible move that changes nothing is taken only when no move saves
  anything (it crosses a stretch without inputs). The moved ramp's
  step doubles, as do the steps of feasible moves that changed neither
  agreement nor cost. When no move is feasible, every step above `min_step`
  (of a threshold still <= 1) halves; when none can, the search ends. The
  result with the lowest mean cost over all initial steps is returned.

  Differences from the original code, on purpose: feasibility is `<=` the
  budget (Apparate: strict `<`), and a best move at ramp 0 is not mistaken
  for "no move" (Apparate tests `not best_direction`).

  Args:
    traces: the fit rows.
    max_loss: agreement-loss budget (e.g. 0.01 or 0.015), or a sequence of
      budgets `[B]` (one search each, sharing the per-ramp sorts).
    steps: initial step sizes to try.
    min_step: steps are not halved below this.

  Returns:
    `[K]` thresholds on `1 - conf` (`[B, K]` for a sequence of budgets); the
    last is `+inf` (always exit).

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.baselines import apparate_greedy
    >>> conf = np.array([[0.99, 0.99, 1.0], [0.5, 0.9, 1.0]])
    >>> t = jexit.Traces(conf, np.zeros((2, 3), int), None, np.ones(3))
    >>> apparate_greedy(t, 0.0).shape
    (3,)
  """
  traces = check_traces(traces)
  budgets = np.asarray(max_loss)
  ok = budgets.dtype.kind in "iuf"  # a string "0.01" is a mistake, not a budget
  budgets = budgets.astype(np.float64) if ok else budgets
  if not ok or budgets.ndim > 1 or budgets.size == 0 or not np.all((budgets >= 0)
                                                                    & (budgets <= 1)):
    raise ValueError(f"max_loss: expected an agreement-loss budget in [0, 1] (or a 1-D "
                     f"sequence of them), got {max_loss!r}")
  if not steps or min(steps) <= 0 or not min_step > 0:
    raise ValueError(f"steps, min_step: expected positive step sizes, got {steps}, {min_step}")
  u = _uncertainty(traces)
  k = traces.num_ramps
  agree = traces.pred == traces.pred[:, -1:]
  ramp_cost = np.cumsum(traces.cost)
  dirs = k - 1
  tol = 1e-12 * max(ramp_cost[-1], 1.0)

  n = len(u)
  # Thresholds only rise, so a move from t to t' stops, at ramp d, exactly the
  # inputs with t <= u[:, d] < t' that now stop later: a slice of ramp d's
  # inputs sorted by u. Counts are integers; loss and cost derive from them.
  order = [np.argsort(u[:, j], kind="stable") for j in range(dirs)]
  sorted_u = [u[order[j], j] for j in range(dirs)]

  def moved_rows(stop, d, lo, hi):  # inputs that a move of ramp d from lo to hi stops
    a, b = np.searchsorted(sorted_u[d], (lo, hi), side="left")
    rows = order[d][a:b]
    return rows[stop[rows] > d]

  metrics = lambda agree_count, stop_count: (1.0 - agree_count / n, stop_count @ ramp_cost / n)

  def search(max_loss):  # one greedy search: [K] thresholds
    best_t, best_cost = np.zeros(dirs), np.inf
    for s in steps:
      t = np.zeros(dirs)
      step = np.full(dirs, float(s))
      stop = np.full(n, k - 1)
      agree_count = int(agree[:, -1].sum())
      stop_count = np.bincount(stop, minlength=k)
      loss, cost = metrics(agree_count, stop_count)
      for _ in range(max_rounds):
        open_dirs = np.flatnonzero(t <= 1)
        moved = False
        if open_dirs.size:
          # Rounded to 4 decimals, as Apparate does, so thresholds stay on a clean grid.
          new_t = np.round(t[open_dirs] + step[open_dirs], 4)
          c_rows, c_agree, c_count = [], [], []
          for d, hi in zip(open_dirs, new_t):
            rows = moved_rows(stop, d, t[d], hi)
            count = stop_count.copy()
            np.subtract.at(count, stop[rows], 1)
            count[d] += len(rows)
            c_rows.append(rows)
            c_agree.append(agree_count + int(agree[rows, d].sum())
                           - int(agree[rows, stop[rows]].sum()))
            c_count.append(count)
          c_loss, c_cost = metrics(np.array(c_agree), np.stack(c_count))
          feasible = c_loss <= max_loss + 1e-12
          saving = cost - c_cost
          real = feasible & (saving > tol)
          unchanged = feasible & ((saving <= tol) | (np.abs(c_loss - loss) <= 1e-12))
          free = feasible & (saving <= tol) & (c_loss <= loss + 1e-12)
          if real.any():
            score = np.where(real, (c_loss - loss) / np.where(real, saving, 1.0), np.inf)
            pick = int(np.argmin(score))
          elif free.any():
            pick = int(np.argmax(free))
          else:
            pick = -1
          if pick >= 0:
            d = open_dirs[pick]
            t[d] = new_t[pick]
            stop[c_rows[pick]] = d
            agree_count, stop_count = c_agree[pick], c_count[pick]
            loss, cost = c_loss[pick], c_cost[pick]
            grow = open_dirs[unchanged]
            step[grow[grow != d]] *= 2
            step[d] *= 2
            moved = True
        if not moved:
          shrink = (step > min_step + 1e-12) & (t <= 1)
          if not shrink.any():
            break
          step[shrink] /= 2
      if cost < best_cost - tol:
        best_t, best_cost = t.copy(), cost
    return np.append(best_t, np.inf)

  if budgets.ndim == 0:
    return search(float(budgets))
  return np.stack([search(float(b)) for b in budgets])


def patience(traces: Traces, patiences: Optional[Sequence[int]] = None, *,
             return_per_input: bool = False) -> Evaluation:
  """PABEE: stop when the prediction has not changed for t consecutive ramps.

  The count of consecutive unchanged predictions resets when a ramp's pred
  differs from the previous ramp's; the input exits at the first ramp where
  the count reaches t (else at the last), outputting that ramp's pred.
  `param` is t (default 1 .. K-1).
  """
  traces = check_traces(traces)
  k = traces.num_ramps
  t = np.arange(1, max(k, 2)) if patiences is None else np.asarray(patiences)
  if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer) or t.min() < 1:
    raise ValueError(f"patiences: expected a non-empty [P] array of integers >= 1, got {t}")
  _check_batch("patiences", t.size, traces, 1)
  run = np.zeros(traces.conf.shape, np.int64)
  for r in range(1, k):
    run[:, r] = np.where(traces.pred[:, r] == traces.pred[:, r - 1], run[:, r - 1] + 1, 0)
  reached = run[None, :, :] >= t[:, None, None]  # [P, N, K]
  reached[:, :, -1] = True
  stop = np.argmax(reached, axis=2)
  return summarize(stop, stop, traces, param=t, return_per_input=return_per_input)


def fixed_ramp(traces: Traces, ramps: Optional[Sequence[int]] = None, *,
               return_per_input: bool = False) -> Evaluation:
  """Always exit at ramp k (0-based; `param` is k, default every ramp)."""
  traces = check_traces(traces)
  k = traces.num_ramps
  r = np.arange(k) if ramps is None else np.asarray(ramps)
  if r.ndim != 1 or r.size == 0 or not np.issubdtype(r.dtype, np.integer) \
      or r.min() < 0 or r.max() >= k:
    raise ValueError(f"ramps: expected integers in [0, {k}), got {r}")
  _check_batch("ramps", r.size, traces, 0)
  stop = np.broadcast_to(r[:, None], (r.size, traces.num_inputs))
  return summarize(stop, stop, traces, param=r, return_per_input=return_per_input)


def backbone(traces: Traces, *, return_per_input: bool = False) -> Evaluation:
  """Always run to the last ramp (`param` is K-1)."""
  traces = check_traces(traces)
  return fixed_ramp(traces, [traces.num_ramps - 1], return_per_input=return_per_input)


def default_oracle_lambdas(traces: Traces, num: int = 200) -> np.ndarray:
  """`[P]` 0 and log-spaced lam where the 0/1 disagreement and cost trade."""
  traces = check_traces(traces)
  total = float(np.sum(traces.cost))
  pos = traces.cost[traces.cost > 0]
  return np.concatenate([[0.0], np.geomspace(1e-3 / total, 2.0 / pos.min(), num - 1)])


def oracle(traces: Traces, lambdas: Optional[Sequence[float]] = None, *,
           target: str = "agreement", return_per_input: bool = False) -> Evaluation:
  """The hindsight oracle (offline optimum): a bound, not a policy.

  Per input, the ramp minimising `disagree_k + lam * (c_1 + ... + c_k)`
  (earliest on ties), with `disagree_k` = 1 if ramp k's pred differs from the
  final ramp's. At lam = 0 it is the earliest ramp that agrees with the final
  one. No policy's `(1 - agreement) + lam * mean_cost` is below the oracle's
  at any lam. `param` is lam (default: `default_oracle_lambdas`). With
  `target="label"`, `disagree_k` = 1 if ramp k's pred differs from the label
  (the bound for accuracy): at lam = 0, the first correct ramp.
  """
  traces = check_traces(traces)
  if target not in ("agreement", "label"):
    raise ValueError(f"target: expected 'agreement' or 'label', got {target!r}")
  if target == "label" and traces.label is None:
    raise ValueError("target: 'label' needs traces.label, which is None")
  lam = default_oracle_lambdas(traces) if lambdas is None else np.asarray(lambdas,
                                                                          np.float64)
  if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)) or np.any(lam < 0):
    raise ValueError(f"lambdas: expected a non-empty [P] array of finite values >= 0, "
                     f"got shape {lam.shape}")
  # Only two ramps can be optimal: ramp 0 (the cheapest) and the first ramp
  # that agrees with the final one (the cheapest without a disagreement).
  # Every other ramp costs at least as much as one of them for the same
  # disagreement, and ties go to the earlier ramp.
  _check_batch("lambdas", lam.size, traces, 0)
  ramp_cost = np.cumsum(np.asarray(traces.cost, np.float64))
  truth = traces.pred[:, -1:] if target == "agreement" else traces.label[:, None]
  agree = traces.pred == truth
  first = np.argmax(agree, axis=1)  # [N] the first agreeing ramp (0 when none)
  take_first = lam[:, None] * ramp_cost[first][None, :] < 1.0 + lam[:, None] * ramp_cost[0]
  stop = np.where((first == 0)[None, :] | take_first, first[None, :], 0)
  return summarize(stop, stop, traces, param=lam, return_per_input=return_per_input)
