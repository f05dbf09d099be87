"""Ramp placement: which candidate ramps (and heads) to deploy, per loss budget.

A trace may record more candidate ramps than will be deployed (PROBLEM.md,
"Ramp placement"); `jexit.subsets` gives each deployable subset its costs and
exit model, built from pieces fitted once on the fit rows.

`place` enumerates the subsets, solves all of them x the lam grid in batched
`jexit.solve` calls (one per subset size by default, or one call for all,
subsets of fewer ramps padded in front with ramps that cost nothing and never
stop; either chunked by a memory budget: `jexit.subsets.solve_subsets`),
replays every policy on the fit and the held-out rows, and chooses the subset
and lam together on the fit rows (`jexit.select.choose_index`: the subset is
one more choice made on fit rows). With `delta`, the chosen subset's lam path
is certified on the held-out (calibration) rows as `jexit.select.choose` does.
It also scores, on the same rows, all candidates, evenly spaced subsets of
each size, Apparate-style greedy placement and any fixed subsets given.
Reports: `jexit.report.placement_to_dict`, `format_placement`;
`jexit.plots.plot_placement`; the table: `jexit.export.export_placement`.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from jexit import certify
from jexit.evaluation import Evaluation
from jexit.select import choose_index
from jexit.select_certify import _certified_split, _replay_outputs
from jexit.subsets import (DEFAULT_MAX_BYTES, NUM_BINS, NUM_LAMBDAS, Pieces, backbone_cost,
                           check_ramps, enumerate_subsets, evenly_spaced, head_costs,
                           place_models, placement_lambdas, side_rows, signal_name,
                           solve_subsets, subset_costs, subset_counts, subset_model)
from jexit.traces import check_traces, split_rows
from jexit.types import Traces, is_real_scalar

__all__ = ["BudgetPlacement", "Placement", "place"]

MAX_CANDIDATES = 16  # 2^15 subsets: beyond this, ask for max_ramps


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

  Every deployable subset (`jexit.subsets.enumerate_subsets`) gets its model
  from shared pieces fitted on the fit rows (`place_models`, `subset_model`);
  all subsets x the lam grid are solved in batched `solve` calls
  (`solve_subsets`, chunks under `max_bytes`), replayed on fit and held-out
  rows, and per budget the (subset, lam) with the most fit speedup within the
  budget is chosen (`jexit.select.choose_index`). Speedups are against the
  backbone without exits (every segment and the last ramp's head), so subsets
  compare.

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
  signal_name(traces, signal)
  if k > MAX_CANDIDATES and max_ramps is None:
    raise ValueError(f"max_ramps: {k} candidates give 2^{k - 1} subsets; expected "
                     f"max_ramps with more than {MAX_CANDIDATES} candidates")
  subsets = enumerate_subsets(k, position=position, max_ramps=max_ramps,
                              must_include=must_include)
  fixed = {name: check_ramps(f"fixed[{name!r}]", a, k) for name, a in (fixed or {}).items()}
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
  sides = {"fit": side_rows(traces, fit_r, pieces, dtype),
           "test": side_rows(traces, test_r, pieces, dtype)}
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
             position=position, must=check_ramps("must_include", must_include, k),
             max_ramps=max_ramps, block=block, seed=seed)
  out = []
  for b in budgets:
    start = time.perf_counter()
    out.append(_budget(result, b, ctx, compare=compare, fixed=fixed, delta=delta,
                       certify_test=certify_test))
    timings[f"choose_{b:g}_s"] = time.perf_counter() - start
  return result._replace(budgets=out)


# ------------------------------------------------------ the choice, certified

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

