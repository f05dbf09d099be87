"""The fit/test protocol: row splits and folds, and every method's frontier on them.

Every parameter is chosen on fit rows and reported on disjoint test rows
(PROBLEM.md): `frontier` splits the trace (seeded; half and half by default,
or k folds for cross-fitting), fits the candidate models on the fit rows,
solves a whole lam grid in one call, and evaluates every method's parameter
grid on both the fit and the test rows. Choosing a parameter for a budget is
`jexit.select`'s job; printing and JSON are `jexit.report`'s.
"""

import inspect
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from jexit import baselines, signals
from jexit.evaluation import DEFAULT_MAX_BYTES, evaluate
from jexit.fit import class_scores, fit
from jexit.metrics import _PER_POLICY, Evaluation, cost_quantiles
from jexit.solver import available_host_bytes, solve, working_dtype
from jexit.traces import check_traces, fold_rows, split_rows
from jexit.types import Binning, ExitModel, Policy, Traces, is_int_scalar


# The model settings every command uses unless told otherwise, chosen by the
# measurements of experiments/reports/QUALITY.md: per-ramp quantile bins, a logistic
# calibration of the disagreement rate as the loss, and candidate policies
# pooled over three bin counts (a tuple of num_bins fits one model per value;
# the lam x num_bins grid is one parameter grid, chosen on fit rows). The
# paper's setting is PAPER_FIT. Change the defaults here, in one place.
DEFAULT_FIT = {"bins": "quantile", "num_bins": (16, 32, 64), "loss": "logistic"}
PAPER_FIT = {"bins": "uniform", "step": 0.08, "loss": "proxy"}
METHODS = ("recall", "norecall", "global_threshold", "apparate_greedy", "patience",
           "fixed_ramp", "backbone", "oracle")
APPARATE_BUDGETS = (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2)
METRICS = ("agreement", "accuracy")  # what a loss budget limits
NUM_LAMBDAS = 1000


# What `fit_options` may hold: jexit.fit's keyword arguments (frontier picks the rows).
_FIT_KEYWORDS = frozenset(inspect.signature(fit).parameters) - {"traces", "rows"}


def merged_fit_options(overrides: Optional[dict] = None) -> dict:
  """`DEFAULT_FIT` updated with the non-None entries of `overrides`."""
  opts = dict(DEFAULT_FIT)
  opts.update({k: v for k, v in (overrides or {}).items() if v is not None})
  return opts


def fit_candidates(traces: Traces, rows, options: dict, fit_fn: Callable = fit):
  """`[(model, binning)]`: one `fit_fn(traces, rows=rows, **options)` per value
  when `options["num_bins"]` is a tuple."""
  num_bins = options.get("num_bins")
  bins = options.get("bins", "quantile")
  if isinstance(num_bins, (tuple, list)) and not (isinstance(bins, str) and bins == "quantile"):
    # Only quantile bins use num_bins: one fit, not several identical ones.
    options = {**options, "num_bins": int(num_bins[0]) if num_bins else 16}
  elif isinstance(num_bins, (tuple, list)):
    if not num_bins:
      raise ValueError("num_bins: expected an int or a non-empty tuple of ints, got ()")
    return [fit_fn(traces, rows=rows, **{**options, "num_bins": int(b)}) for b in num_bins]
  return [fit_fn(traces, rows=rows, **options)]


def _concat(evals: Sequence[Evaluation]) -> Evaluation:
  """Evaluations of several parameter grids as one grid `[P1 + P2 + ...]`."""
  if len(evals) == 1:
    return evals[0]
  cat = lambda f: None if getattr(evals[0], f) is None else np.concatenate(
      [np.asarray(getattr(e, f)) for e in evals])
  return evals[0]._replace(**{f: cat(f) for f in _PER_POLICY})


def default_lambdas(model: ExitModel, num: int = NUM_LAMBDAS) -> np.ndarray:
  """`[num]` log-spaced lam over the range where the policy changes.

  Continuing one more ramp costs `lam * c` and can gain at most the spread of
  the losses, so above `spread / min positive cost` every policy stops at
  ramp 1; far below `spread / total cost` it runs nearly everything. The grid
  spans `1e-4 * spread / total` to `2 * spread / min cost`.
  """
  loss = np.asarray(model.loss, np.float64)
  cost = np.asarray(model.cost, np.float64)
  if not is_int_scalar(num) or num < 1:
    raise ValueError(f"num_lambdas: expected an integer >= 1, got {num!r}")
  spread = float(loss.max() - loss.min()) or 1.0
  pos = cost[cost > 0]
  if pos.size == 0:
    raise ValueError(f"model.cost: expected a positive cost, got {cost.tolist()}")
  return np.geomspace(1e-4 * spread / cost.sum(), 2.0 * spread / pos.min(), num)


def pareto_mask(agreement: np.ndarray, mean_cost: np.ndarray) -> np.ndarray:
  """`[P]` bool: points no other point beats (>= agreement and <= cost, one strictly).

  Of equal points, the first is kept.
  """
  agreement = np.asarray(agreement, np.float64)
  mean_cost = np.asarray(mean_cost, np.float64)
  order = np.lexsort((np.arange(len(agreement)), -agreement, mean_cost))
  keep = np.zeros(len(agreement), bool)
  best = -np.inf
  for i in order:
    if agreement[i] > best:
      keep[i] = True
      best = agreement[i]
  return keep


def pool(evals: Sequence[Evaluation], cost: np.ndarray) -> Evaluation:
  """Pools evaluations of the same parameters on disjoint row sets (folds).

  Rates are averaged with the row counts as weights, which is the metric on
  the union of the rows; quantiles are recomputed from the pooled histogram.
  """
  if len(evals) == 1:
    return evals[0]
  w = np.array([e.num_inputs for e in evals], np.float64)
  n = w.sum()
  avg = lambda f: None if getattr(evals[0], f) is None else sum(
      wi * np.asarray(getattr(e, f)) for wi, e in zip(w, evals)) / n
  stop_hist = avg("stop_hist")
  mean_cost = avg("mean_cost")
  q = cost_quantiles(stop_hist * n, cost)
  return evals[0]._replace(
      agreement=avg("agreement"), accuracy=avg("accuracy"), mean_cost=mean_cost,
      speedup=float(np.sum(cost)) / mean_cost, stop_hist=stop_hist,
      output_hist=avg("output_hist"), p50_cost=q[..., 0], p95_cost=q[..., 1],
      p99_cost=q[..., 2], objective=avg("objective"), num_inputs=int(n),
      stop_ramp=None, output_ramp=None)


class Frontier(NamedTuple):
  """Every method's parameter grid evaluated on fit and held-out rows.

  Attributes:
    test: method -> `Evaluation [P]` on the test rows (pooled over folds).
    fit: method -> `Evaluation [P]` on the fit rows (averaged over folds).
    pareto: method -> `[P]` bool, Pareto-optimal on the fit rows.
    split: how rows were split (seed, test fraction or folds, row counts).
    splits: per split, method -> `(fit Evaluation, test Evaluation)`.
    apparate_thresholds: per split, `[B, K]` thresholds found for each
      budget in `test["apparate_greedy"].param`.
    fit_options: the `jexit.fit` options used.
    policy: the recall `Policy [L]` of the first split's first candidate
      model (for plots).
    model: the first split's first `ExitModel`.
    binning: the first split's first `Binning`.
    candidates: per split, the `(model, binning)` of each candidate model; the
      recall and norecall grids are `L` lam values per candidate, in order.
    markov_candidates: per split, the candidates the norecall grid was solved
      from: `candidates` itself, or, when those are state-conditioned (recall
      only), the Markov models they shrink towards.
    lambdas: the `[L]` lam grid.
    backbone_fit_accuracy: per split, the backbone's accuracy on the fit rows
      (None without labels): the reference of `metric="accuracy"` budgets.
  """
  test: Dict[str, Evaluation]
  fit: Dict[str, Evaluation]
  pareto: Dict[str, np.ndarray]
  split: dict
  splits: List[Dict[str, tuple]]
  apparate_thresholds: List[np.ndarray]
  fit_options: dict
  policy: Optional[Policy]
  model: ExitModel
  binning: Binning
  candidates: List[list] = []
  lambdas: Optional[np.ndarray] = None
  backbone_fit_accuracy: List[Optional[float]] = []
  markov_candidates: List[list] = []


def candidate_policy(fr: "Frontier", method: str, index: int, split: int = 0):
  """The policy behind entry `index` of a recall/norecall grid of `fr`.

  Returns:
    `(policy [L], lam_index, model, binning)`: the candidate model's policy
    for the whole lam grid, and where the entry sits in it.
  """
  if method not in ("recall", "norecall"):
    raise ValueError(f"method: expected 'recall' or 'norecall', got {method!r}")
  num_lam = len(fr.lambdas)
  source = fr.markov_candidates if method == "norecall" and fr.markov_candidates else fr.candidates
  model, binning = source[split][index // num_lam]
  policy = solve(model, fr.lambdas, recall=method == "recall")
  return policy, index % num_lam, model, binning


def frontier_bytes(candidates, num_lam: int, methods: Sequence[str], num_splits: int) -> int:
  """Estimated peak host memory, in bytes, of `frontier`'s solver policies.

  Per lam value: the recall policy kept for the first split and the one being
  evaluated (`[K, S]` thresholds each), and, per solver method, candidate model,
  fit/test side and split (plus the pooled copy), one evaluation's per-policy
  fields (`[K]` histograms and nine scalars, float64). On the demo trace (3
  candidates, K = 3) peak resident memory grew by 4.3 KiB per lam value with one
  split and 10.3 KiB with 5 folds; this estimates 3.75 and 9.4 KiB.
  """
  itemsize = np.dtype(working_dtype()).itemsize
  k = max(m.loss.shape[-2] for m, _ in candidates)
  sizes = [m.loss.shape[-1] for m, _ in candidates]
  solved = sum(m in ("recall", "norecall") for m in methods)
  if not solved:
    return 0
  tables = itemsize * k * (max(sizes) + sizes[0])
  evals = solved * len(candidates) * 2 * (num_splits + 1) * 8 * (9 + 2 * k)
  return int(num_lam) * (tables + evals)


def _check_memory(name, num_lam, candidates, methods, num_splits):
  need = frontier_bytes(candidates, num_lam, methods, num_splits)
  free = available_host_bytes()
  if need > free:
    raise ValueError(
        f"{name}: {num_lam} lam values need about {need / 2**30:.1f} GiB for the solved "
        f"policies and their evaluations ({len(candidates)} candidate models, "
        f"{num_splits} split(s)); about {free / 2**30:.1f} GiB is free. Use fewer lam "
        f"values, or call jexit.solve and jexit.evaluate on blocks of them.")


def _solved(name, fit_t, test_t, run):
  """The recall or no-recall grid of every candidate model: `(fit, test, policy)`."""
  fits, tests, first = [], [], None
  for model, binning in (run["candidates"] if name == "recall" else run["markov"]):
    pol = solve(model, run["lambdas"], recall=name == "recall")
    first = pol if first is None else first
    if run["fit_signal"] is None:
      fits.append(evaluate(pol, fit_t, binning, max_bytes=run["max_bytes"]))
    else:
      fits.append(evaluate(pol, fit_t._replace(signal=run["fit_signal"]),
                           binning._replace(signal="signal", calibration=None),
                           max_bytes=run["max_bytes"]))
    tests.append(evaluate(pol, test_t, binning, max_bytes=run["max_bytes"]))
  return _concat(fits), _concat(tests), first


def _apparate(fit_t, test_t, run):
  budgets = np.asarray(run["apparate_budgets"], np.float64)
  thresholds = baselines.apparate_greedy(fit_t, budgets)
  rule = lambda t: baselines.threshold_rule(t, thresholds, param=budgets)
  return rule(fit_t), rule(test_t), thresholds


def _both(f, args=lambda run: ()):
  """A baseline scored on both sides: `f(traces, *args(run))`."""
  return lambda fit_t, test_t, run: (f(fit_t, *args(run)), f(test_t, *args(run)), None)


# method -> `(fit traces, test traces, run settings) -> (fit Evaluation, test
# Evaluation, what the split keeps: the recall Policy, Apparate's thresholds)`.
RUNNERS = {
    "recall": lambda f, t, run: _solved("recall", f, t, run),
    "norecall": lambda f, t, run: _solved("norecall", f, t, run),
    "global_threshold": _both(baselines.global_threshold, lambda run: (run["threshold_grid"],)),
    "apparate_greedy": _apparate,
    "patience": _both(baselines.patience),
    "fixed_ramp": _both(baselines.fixed_ramp),
    "backbone": _both(baselines.backbone),
    "oracle": lambda f, t, run: (
        baselines.oracle(f, run["oracle_lambdas"], target=run["oracle_target"]),
        baselines.oracle(t, run["oracle_lambdas"], target=run["oracle_target"]), None),
}


def _run_split(traces, fit_rows, test_rows, methods, run):
  """Every method on one split: `(method -> (fit Evaluation, test Evaluation),
  the first recall Policy, Apparate's thresholds)`.

  `run["fit_signal"] [len(fit_rows), K]`: the fit rows' cross-fitted "class"
  signal, on which the models were fitted and their fit rows are scored (the
  calibration, fitted on all fit rows, scores the held-out rows).
  """
  fit_t, test_t = traces.take(fit_rows), traces.take(test_rows)
  out, kept = {}, {}
  for name in methods:
    fit_ev, test_ev, keep = RUNNERS[name](fit_t, test_t, run)
    out[name], kept[name] = (fit_ev, test_ev), keep
  return out, kept.get("recall"), kept.get("apparate_greedy")


def frontier(traces: Traces, *,
             lambdas=None,
             num_lambdas: int = NUM_LAMBDAS,
             test_fraction: float = 0.5,
             seed: int = 0,
             folds: Optional[int] = None,
             block: int = 1,
             fit_options: Optional[dict] = None,
             methods: Sequence[str] = METHODS,
             apparate_budgets: Sequence[float] = APPARATE_BUDGETS,
             threshold_grid=None,
             oracle_lambdas=None,
             max_bytes: int = DEFAULT_MAX_BYTES,
             metric: str = "agreement",
             candidates: Optional[Callable] = None) -> Frontier:
  """Evaluates every method's parameter grid on fit rows and on held-out rows.

  Splits the rows (seeded; `test_fraction` held out, or `folds`-fold
  cross-fitting, where every row is held out once and test metrics pool the
  folds), fits the model on the fit rows with `fit_options` (over
  `DEFAULT_FIT`), solves the recall and no-recall policies for the whole lam
  grid in one call each, and evaluates them and every baseline's grid.

  Args:
    traces: the traces.
    lambdas: `[L]` lam grid (default: `default_lambdas` of the first split's
      model, `num_lambdas` values); shared by all folds.
    num_lambdas: L for the default grid. A grid whose solved policies and
      evaluations would not fit in the host's free memory (`frontier_bytes`)
      is refused with a ValueError before anything is solved.
    test_fraction: share of rows held out (single split).
    seed: seed of the split.
    folds: k for k-fold cross-fitting instead of one split.
    block: rows are split in blocks of this many consecutive rows (related
      inputs, e.g. augmented copies of one image, stay on one side).
    fit_options: `jexit.fit` keyword arguments overriding `DEFAULT_FIT`; a
      tuple `num_bins` fits one candidate model per value.
    methods: which of `METHODS` to run.
    apparate_budgets: agreement-loss budgets Apparate's greedy search is run
      with (its parameter grid).
    threshold_grid: `[T]` global thresholds (default: from the first split's
      fit rows).
    oracle_lambdas: `[P]` lam grid of the hindsight oracle.
    max_bytes: memory budget of `evaluate`'s chunks.
    metric: `"agreement"` or `"accuracy"` (needs labels): what the hindsight
      oracle is a bound of (the first ramp that agrees with the final one, or
      the first correct one).
    candidates: `(traces, rows, options) -> [(model, binning), ...]`, the
      candidate models of a split (default `fit_candidates`; research variants
      pass theirs, e.g. `jexit.contrib.candidates`). If its models are
      state-conditioned (recall only), the no-recall grid is solved on the
      Markov models of `candidates.markov` (default `fit_candidates`).

  Returns:
    A `Frontier`.

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.protocol import frontier
    >>> rng = np.random.default_rng(0)
    >>> conf = np.sort(rng.uniform(0.3, 1, (400, 3)), axis=1)
    >>> t = jexit.Traces(conf, rng.integers(0, 2, (400, 3)), None, np.ones(3))
    >>> fr = frontier(t, num_lambdas=50, methods=("recall", "backbone"))
    >>> fr.test["recall"].agreement.shape, fr.split["test_rows"]  # 50 lam x 3 models
    ((150,), 200)
  """
  traces = check_traces(traces)
  n, k = traces.conf.shape
  if metric not in METRICS:
    raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
  if metric == "accuracy" and traces.label is None:
    raise ValueError("metric: 'accuracy' needs traces with labels (traces.label is None)")
  if k < 2:
    raise ValueError(f"traces.conf: expected at least 2 ramps for a frontier, got K={k}")
  methods = tuple(methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"methods: expected a non-empty subset of {list(METHODS)}, got {unknown or methods}")
  if fit_options is not None and not isinstance(fit_options, dict):
    raise ValueError(f"fit_options: expected a dict of jexit.fit arguments, got "
                     f"{type(fit_options).__name__}")
  unknown = sorted(set(fit_options or {}) - _FIT_KEYWORDS)
  if unknown:
    raise ValueError(f"fit_options: unknown key(s) {unknown}; expected jexit.fit arguments "
                     f"{sorted(_FIT_KEYWORDS)}")
  opts = merged_fit_options(fit_options)
  if folds is None:
    rows = [split_rows(n, test_fraction=test_fraction, seed=seed, block=block)]
    split = {"seed": seed, "test_fraction": test_fraction, "num_inputs": n,
             "fit_rows": int(len(rows[0][0])), "test_rows": int(len(rows[0][1]))}
  else:
    rows = fold_rows(n, folds, seed=seed, block=block)
    split = {"seed": seed, "folds": int(folds), "num_inputs": n,
             "fit_rows": int(np.mean([len(f) for f, _ in rows])), "test_rows": n}
  split["block"] = int(block)
  split.update(pareto="chosen on fit rows", metrics="test rows")

  by_class = signals.get(opts.get("signal") or "1-conf", "fit_options.signal").needs_calibration
  if by_class:  # the class signal's inner folds keep the split's blocks whole
    opts = {**opts, "class_block": int(block)}
  candidates = fit_candidates if candidates is None else candidates
  fitted = [candidates(traces, f, opts) for f, _ in rows]
  markov = fitted
  if "norecall" in methods and any(np.ndim(m.trans) == 4 for c in fitted for m, _ in c):
    # Without recall the state is the bin alone: the no-recall policies are
    # solved on the Markov models the state-conditioned ones shrink towards.
    markov_fn = getattr(candidates, "markov", fit_candidates)
    markov = [markov_fn(traces, f, opts) for f, _ in rows]
  if lambdas is None:
    if is_int_scalar(num_lambdas) and num_lambdas >= 1:  # before default_lambdas allocates
      _check_memory("num_lambdas", int(num_lambdas), fitted[0], methods, len(rows))
    lambdas = default_lambdas(fitted[0][0][0], num_lambdas)
  else:
    lambdas = np.asarray(lambdas, np.float64)
    if lambdas.ndim == 1:
      _check_memory("lambdas", lambdas.size, fitted[0], methods, len(rows))
  if threshold_grid is None:
    threshold_grid = baselines.default_threshold_grid(traces.take(rows[0][0]))
  if oracle_lambdas is None:
    oracle_lambdas = baselines.default_oracle_lambdas(traces)

  splits, thresholds, policy = [], [], None
  for i, ((fit_r, test_r), cands, markov_c) in enumerate(zip(rows, fitted, markov)):
    run = {"candidates": cands, "markov": markov_c, "lambdas": lambdas,
           "fit_signal": class_scores(traces.take(fit_r), int(block))[1] if by_class else None,
           "apparate_budgets": apparate_budgets, "threshold_grid": threshold_grid,
           "oracle_lambdas": oracle_lambdas, "max_bytes": max_bytes,
           "oracle_target": "label" if metric == "accuracy" else "agreement"}
    res, pol, thr = _run_split(traces, fit_r, test_r, methods, run)
    splits.append(res)
    thresholds.append(thr)
    if i == 0:
      policy = pol
  test = {m: pool([s[m][1] for s in splits], traces.cost) for m in methods}
  fit_ev = {m: pool([s[m][0] for s in splits], traces.cost) for m in methods}
  pareto = {m: pareto_mask(fit_ev[m].agreement, fit_ev[m].mean_cost) for m in methods}
  return Frontier(test=test, fit=fit_ev, pareto=pareto, split=split, splits=splits,
                  apparate_thresholds=thresholds, fit_options=opts, policy=policy,
                  model=fitted[0][0][0], binning=fitted[0][0][1], candidates=fitted,
                  lambdas=lambdas,
                  backbone_fit_accuracy=[_backbone_accuracy(traces, f) for f, _ in rows],
                  markov_candidates=markov)


def _backbone_accuracy(traces: Traces, rows) -> Optional[float]:
  if traces.label is None:
    return None
  return float(np.mean(traces.pred[rows, -1] == traces.label[rows]))


def param_value(fr: Frontier, method: str, split: int, index: int):
  """The parameter behind entry `index` of `method`'s grid on split `split`:
  lam and bin count, a threshold, Apparate's per-ramp thresholds, ..."""
  if method == "apparate_greedy":
    # The thresholds of ramps 1..K-1 (the last ramp always exits), as Apparate lists them.
    return [float(v) for v in fr.apparate_thresholds[split][index][:-1]]
  if method in ("recall", "norecall"):
    lam = float(fr.lambdas[index % len(fr.lambdas)])  # float64, as the user gave it
    binning = fr.candidates[split][index // len(fr.lambdas)][1]
    return {"lam": lam, "num_bins": binning.num_bins}
  value = np.asarray(fr.splits[split][method][0].param)[index]
  return value.item() if hasattr(value, "item") else value
