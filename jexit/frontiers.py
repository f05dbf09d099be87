"""The accuracy-cost frontier of every method, and the choice of a parameter for a budget.

Every parameter is chosen on fit rows and reported on disjoint test rows
(PROBLEM.md): `frontier` splits the trace (seeded; half and half by default,
or k folds for cross-fitting), fits the model on the fit rows, solves a whole
lam grid in one call, and evaluates every method's parameter grid on both the
fit and the test rows. `budget` picks, per method, the parameter with the most
speedup on the fit rows that meets an agreement-loss budget there, and reports
its fit and test metrics.
"""

import inspect
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from jexit import baselines
from jexit.evaluation import (_PER_POLICY, DEFAULT_MAX_BYTES, Evaluation, cost_quantiles,
                            evaluate, select)
from jexit.fit import MAX_CLASSES, class_scores, fit
from jexit import signals
from jexit.signals import NAMES as SIGNALS
from jexit.solver import available_host_bytes, solve, working_dtype
from jexit.traces import check_traces, fold_rows, own_signal, row_blocks, split_rows
from jexit.types import Binning, ExitModel, Policy, Traces, is_int_scalar, is_real_scalar

# The model settings every command uses unless told otherwise, chosen by the
# measurements of experiments/QUALITY.md: per-ramp quantile bins, a logistic
# calibration of the disagreement rate as the loss, and candidate policies
# pooled over three bin counts (a tuple of num_bins fits one model per value;
# the lam x num_bins grid is one parameter grid, chosen on fit rows). The
# paper's setting is PAPER_FIT. Change the defaults here, in one place.
DEFAULT_FIT = {"bins": "quantile", "num_bins": (16, 32, 64), "loss": "logistic"}
PAPER_FIT = {"bins": "uniform", "step": 0.08, "loss": "proxy"}
METHODS = ("recall", "norecall", "global_threshold", "apparate_greedy", "patience",
           "fixed_ramp", "backbone", "oracle")
APPARATE_BUDGETS = (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2)
TARGETS = (0.005, 0.01, 0.02, 0.05)
METRICS = ("agreement", "accuracy")  # what a loss budget limits
NUM_LAMBDAS = 1000


# What `fit_options` may hold: jexit.fit's keyword arguments (frontier picks the rows).
_FIT_KEYWORDS = frozenset(inspect.signature(fit).parameters) - {"traces", "rows"}


def merged_fit_options(overrides: Optional[dict] = None) -> dict:
  """`DEFAULT_FIT` updated with the non-None entries of `overrides`."""
  opts = dict(DEFAULT_FIT)
  opts.update({k: v for k, v in (overrides or {}).items() if v is not None})
  return opts


def fit_candidates(traces: Traces, rows, options: dict):
  """`[(model, binning)]`: one fit per value when `options["num_bins"]` is a tuple."""
  num_bins = options.get("num_bins")
  bins = options.get("bins", "quantile")
  if isinstance(num_bins, (tuple, list)) and not (isinstance(bins, str) and bins == "quantile"):
    # Only quantile bins use num_bins: one fit, not several identical ones.
    options = {**options, "num_bins": int(num_bins[0]) if num_bins else 16}
  elif isinstance(num_bins, (tuple, list)):
    if not num_bins:
      raise ValueError("num_bins: expected an int or a non-empty tuple of ints, got ()")
    return [fit(traces, rows=rows, **{**options, "num_bins": int(b)}) for b in num_bins]
  return [fit(traces, rows=rows, **options)]


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
      from: `candidates` itself, or, when `fit_options["history"]` makes those
      state-conditioned (recall only), the Markov models they shrink towards.
    lambdas: the `[L]` lam grid.
    backbone_fit_accuracy: per split, the backbone's accuracy on the fit rows
      (None without labels): the reference of `choose(..., metric="accuracy")`.
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


def _run_split(traces, fit_rows, test_rows, *, candidates, markov_candidates, lambdas,
               methods, apparate_budgets, threshold_grid, oracle_lambdas, max_bytes,
               oracle_target, fit_signal=None):
  """Every method on one split: method -> (fit Evaluation, test Evaluation).

  `fit_signal [len(fit_rows), K]`: the fit rows' cross-fitted "class" signal,
  on which the models were fitted and their fit rows are scored (the
  calibration, fitted on all fit rows, scores the held-out rows).
  """
  fit_t, test_t = traces.take(fit_rows), traces.take(test_rows)
  out, policy, thresholds = {}, None, None
  both = lambda f, *a: (f(fit_t, *a), f(test_t, *a))
  for name in methods:
    if name in ("recall", "norecall"):
      fits, tests = [], []
      for model, binning in (candidates if name == "recall" else markov_candidates):
        pol = solve(model, lambdas, recall=name == "recall")
        if name == "recall" and policy is None:
          policy = pol
        if fit_signal is None:
          fits.append(evaluate(pol, fit_t, binning, max_bytes=max_bytes))
        else:
          fits.append(evaluate(pol, fit_t._replace(signal=fit_signal),
                               binning._replace(signal="signal", calibration=None),
                               max_bytes=max_bytes))
        tests.append(evaluate(pol, test_t, binning, max_bytes=max_bytes))
      out[name] = (_concat(fits), _concat(tests))
    elif name == "global_threshold":
      out[name] = both(baselines.global_threshold, threshold_grid)
    elif name == "apparate_greedy":
      budgets = np.asarray(apparate_budgets, np.float64)
      thresholds = baselines.apparate_greedy(fit_t, budgets)
      out[name] = both(lambda t: baselines.threshold_rule(t, thresholds, param=budgets))
    elif name == "patience":
      out[name] = both(baselines.patience)
    elif name == "fixed_ramp":
      out[name] = both(baselines.fixed_ramp)
    elif name == "backbone":
      out[name] = both(baselines.backbone)
    elif name == "oracle":
      out[name] = both(lambda t, lam: baselines.oracle(t, lam, target=oracle_target),
                       oracle_lambdas)
    else:
      raise ValueError(f"methods: unknown method {name!r}; expected some of {list(METHODS)}")
  return out, policy, thresholds


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
             metric: str = "agreement") -> Frontier:
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
      tuple `num_bins` fits one candidate model per value. With `history`
      (state-conditioned transitions, recall only) the norecall grid is
      solved on the Markov fit of the same rows.
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

  Returns:
    A `Frontier`.

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.frontiers import frontier
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

  by_class = signals.get(opts.get("signal") or "1-conf").needs_calibration
  if by_class:  # the class signal's inner folds keep the split's blocks whole
    opts = {**opts, "class_block": int(block)}
  fitted = [fit_candidates(traces, f, opts) for f, _ in rows]
  markov = fitted
  if opts.get("history") is not None and "norecall" in methods:
    # Without recall the state is the bin alone: the no-recall policies are
    # solved on the Markov models the state-conditioned ones shrink towards.
    markov = [fit_candidates(traces, f, {**opts, "history": None}) for f, _ in rows]
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
  for i, ((fit_r, test_r), candidates, markov_c) in enumerate(zip(rows, fitted, markov)):
    res, pol, thr = _run_split(
        traces, fit_r, test_r, candidates=candidates, markov_candidates=markov_c,
        lambdas=lambdas,
        fit_signal=(class_scores(traces.take(fit_r), int(block))[1] if by_class else None),
        methods=methods, apparate_budgets=apparate_budgets,
        threshold_grid=threshold_grid, oracle_lambdas=oracle_lambdas,
        max_bytes=max_bytes, oracle_target="label" if metric == "accuracy" else "agreement")
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


def _check_metric(metric: str, max_loss: float):
  if metric not in METRICS:
    raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
  low = 0 if metric == "agreement" else -1
  if not is_real_scalar(max_loss) or not (np.isfinite(max_loss) and low <= max_loss <= 1):
    raise ValueError(f"max_loss: expected an {metric}-loss budget in [{low}, 1], got {max_loss}")


def choose_index(evaluation: Evaluation, max_loss: float, *, metric: str = "agreement",
                 reference: float = 1.0) -> Optional[int]:
  """Index of the parameter with most speedup among those within the loss budget.

  The loss is `reference - agreement` with `metric="agreement"` (reference 1:
  the backbone agrees with itself) or `reference - accuracy` with
  `metric="accuracy"` (pass the backbone's accuracy on the same rows; a
  negative `max_loss` then asks for a gain). Ties go to the higher score,
  then to the first. None if none qualifies.
  """
  if metric == "accuracy":
    if evaluation.accuracy is None:
      raise ValueError("metric: 'accuracy' needs traces with labels (traces.label is None)")
    score = np.asarray(evaluation.accuracy, np.float64)
  elif metric == "agreement":
    score = np.asarray(evaluation.agreement, np.float64)
  else:
    raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
  ok = reference - score <= max_loss + 1e-12
  if not ok.any():
    return None
  speed = np.where(ok, evaluation.speedup, -np.inf)
  order = np.lexsort((np.arange(len(speed)), -score, -speed))
  return int(order[0])


class BudgetChoice(NamedTuple):
  """One method's parameter chosen on fit rows for an agreement-loss budget.

  Attributes:
    param: the chosen parameter (lam, a threshold, Apparate's per-ramp
      thresholds, ...); with folds, a list with one per fold. None when no
      parameter met the budget on the fit rows (of some fold).
    fit: `Evaluation [1]` on the fit rows (averaged over folds), or None.
    test: `Evaluation [1]` on the held-out rows (pooled over folds), or None.
  """
  param: object
  fit: Optional[Evaluation]
  test: Optional[Evaluation]


class Budget(NamedTuple):
  """Per method, the parameter chosen on fit rows for `max_loss`, and its metrics.

  `signal_scores` (with `signal="auto"`): per candidate exit signal (and,
  with `metric="accuracy"`, loss target), its mean held-out speedup at
  `max_loss` in the inner cross-validation on the fit rows; the chosen ones
  are `fit_options["signal"]` and `fit_options["target"]`. `metric`: what
  `max_loss` limits, `"agreement"` or `"accuracy"`.
  """
  max_loss: float
  split: dict
  choices: Dict[str, BudgetChoice]
  fit_options: dict
  signal_scores: Optional[Dict[str, float]] = None
  metric: str = "agreement"
  best: Optional[str] = None


# Methods whose chosen parameter `jexit export --max-loss` (method best, its
# default) can ship as a table, in the order that breaks ties of fit speedup.
DEPLOYABLE = ("recall", "norecall", "apparate_greedy", "global_threshold")


def best_method(choices: Dict[str, BudgetChoice]) -> Optional[str]:
  """The deployable method whose chosen parameter has the most fit speedup.

  Chosen on the fit rows only (each choice already met the budget there).
  experiments/union.py measured this rule, after `budget`'s choice of the exit
  signal, with the quality protocol: at least as fast as the best external
  baseline on 31 of 32 held-out cells, against 19 for the recall policy alone,
  and on 32 of 32 averaged over five outer split seeds (experiments/UNION.md).
  """
  best, speed = None, -np.inf
  for m in DEPLOYABLE:
    c = choices.get(m)
    if c is not None and c.fit is not None and float(c.fit.speedup[0]) > speed + 1e-12:
      best, speed = m, float(c.fit.speedup[0])
  return best


SIGNAL_CHOICES = ("auto",) + SIGNALS


def auto_signals(traces: Traces) -> tuple:
  """The exit signals `signal="auto"` chooses among, ties to the first: the
  traces' own (`1 - conf`, or `traces.signal`), `"stability"` and `"class"`
  (unless the predictions are not class ids in [0, MAX_CLASSES))."""
  pred = np.asarray(traces.pred)
  ids = pred.size and pred.min() >= 0 and pred.max() < MAX_CLASSES
  return (own_signal(traces), "stability") + (("class",) if ids else ())


INNER_FOLDS = 4


def signal_score(traces: Traces, signal: str, max_loss: float, *, folds: int = INNER_FOLDS,
                 block: int = 1, fit_options: Optional[dict] = None,
                 num_lambdas: int = NUM_LAMBDAS, max_bytes: int = DEFAULT_MAX_BYTES,
                 metric: str = "agreement") -> float:
  """Mean held-out speedup of the recall policy at `max_loss` under k-fold
  cross-fitting of `traces` (the fit rows of an outer split) with this signal.

  Each fold chooses its parameter on its own fit rows (speedup 1, the
  backbone, when none meets the budget there), as `budget` does.
  """
  return _inner_score(traces, {**(fit_options or {}), "signal": signal}, max_loss,
                      folds=folds, block=block, num_lambdas=num_lambdas, max_bytes=max_bytes,
                      metric=metric)


def _inner_score(traces, options, max_loss, *, folds, block, num_lambdas, max_bytes, metric):
  fr = frontier(traces, folds=folds, block=block, num_lambdas=num_lambdas,
                fit_options=options, methods=("recall",), max_bytes=max_bytes)
  speed = []
  for split, ref in zip(fr.splits, fr.backbone_fit_accuracy):
    fit_ev, test_ev = split["recall"]
    i = choose_index(fit_ev, max_loss, metric=metric,
                     reference=ref if metric == "accuracy" else 1.0)
    speed.append(1.0 if i is None else float(test_ev.speedup[i]))
  return float(np.mean(speed))


def _param_value(fr: Frontier, method: str, split: int, index: int):
  if method == "apparate_greedy":
    # The thresholds of ramps 1..K-1 (the last ramp always exits), as Apparate lists them.
    return [float(v) for v in fr.apparate_thresholds[split][index][:-1]]
  if method in ("recall", "norecall"):
    lam = float(fr.lambdas[index % len(fr.lambdas)])  # float64, as the user gave it
    binning = fr.candidates[split][index // len(fr.lambdas)][1]
    return {"lam": lam, "num_bins": binning.num_bins}
  value = np.asarray(fr.splits[split][method][0].param)[index]
  return value.item() if hasattr(value, "item") else value


def choose(fr: Frontier, max_loss: float, metric: str = "agreement") -> Dict[str, BudgetChoice]:
  """Per method of a frontier, the budget choice made on each split's fit rows.

  `metric="accuracy"` measures the loss as the backbone's accuracy on the
  fit rows minus the parameter's (the traces need labels).
  """
  _check_metric(metric, max_loss)
  if metric == "accuracy" and None in fr.backbone_fit_accuracy:
    raise ValueError("metric: 'accuracy' needs traces with labels (traces.label is None)")
  out = {}
  for method in fr.test:
    params, fits, tests = [], [], []
    for i, res in enumerate(fr.splits):
      fit_ev, test_ev = res[method]
      idx = choose_index(fit_ev, max_loss, metric=metric,
                         reference=fr.backbone_fit_accuracy[i] if metric == "accuracy" else 1.0)
      if idx is None:
        params = None
        break
      params.append(_param_value(fr, method, i, idx))
      fits.append(select(fit_ev, [idx]))
      tests.append(select(test_ev, [idx]))
    if params is None:
      out[method] = BudgetChoice(None, None, None)
      continue
    cost = fr.model.cost
    out[method] = BudgetChoice(params[0] if len(params) == 1 else params,
                               pool(fits, cost), pool(tests, cost))
  return out


def choose_signal(traces: Traces, max_loss: float, *, test_fraction: float = 0.5,
                  seed: int = 0, block: int = 1, fit_options: Optional[dict] = None,
                  num_lambdas: int = NUM_LAMBDAS, inner_folds: int = INNER_FOLDS,
                  max_bytes: int = DEFAULT_MAX_BYTES, metric: str = "agreement"):
  """The exit signal for the solver's model, chosen on the fit rows of a split.

  Scores each of `auto_signals` (the traces' own signal, `1 - conf` or
  `traces.signal`, `"stability"` and `"class"`) with `signal_score` on the fit rows of
  `split_rows(..., test_fraction, seed, block)` (the test rows are not read)
  and returns `(the better one, {signal: score})`; ties go to the traces'
  own. `(None, None)` when the fit rows hold fewer than `2 * inner_folds`
  blocks (too few to compare).
  """
  families = {sig: {"signal": sig} for sig in auto_signals(traces)}
  name, scores = choose_family(traces, max_loss, families, test_fraction=test_fraction,
                               seed=seed, block=block, fit_options=fit_options,
                               num_lambdas=num_lambdas, inner_folds=inner_folds,
                               max_bytes=max_bytes, metric=metric)
  return name, scores


def choose_family(traces: Traces, max_loss: float, families: Dict[str, dict], *,
                  test_fraction: float = 0.5, seed: int = 0, block: int = 1,
                  fit_options: Optional[dict] = None, num_lambdas: int = NUM_LAMBDAS,
                  inner_folds: int = INNER_FOLDS, max_bytes: int = DEFAULT_MAX_BYTES,
                  metric: str = "agreement"):
  """The model family (named `jexit.fit` options) chosen on the fit rows of a split.

  Each family's options (over `fit_options`) are scored by the mean held-out
  speedup of the recall policy at `max_loss` (`metric`) under an
  `inner_folds`-fold cross-fitting of the fit rows of
  `split_rows(..., test_fraction, seed, block)`; the test rows are not read.
  Returns `(name of the best family, {name: score})`, ties to the first
  listed; `(None, None)` when the fit rows hold fewer than `2 * inner_folds`
  blocks (too few to compare).
  """
  traces = check_traces(traces)
  fit_rows, _ = split_rows(traces.num_inputs, test_fraction=test_fraction, seed=seed,
                           block=block)
  if len(row_blocks(len(fit_rows), block)) < 2 * inner_folds:
    return None, None
  inner = traces.take(fit_rows)
  scores = {name: _inner_score(inner, {**(fit_options or {}), **opts}, max_loss,
                               folds=inner_folds, block=block, num_lambdas=num_lambdas,
                               max_bytes=max_bytes, metric=metric)
            for name, opts in families.items()}
  order = list(families)
  return max(order, key=lambda name: (scores[name], -order.index(name))), scores


def model_families(traces: Traces, fit_options: dict, *, signal: Optional[str] = "auto",
                   metric: str = "agreement") -> Dict[str, dict]:
  """The candidate model families `budget` chooses among: `{name: fit options}`.

  Exit signals (`auto_signals`: the traces' own, `"stability"` and `"class"`,
  with `signal="auto"` and no `fit_options["signal"]`) x loss targets (`"agreement"` and `"label"`,
  with `metric="accuracy"` and no `fit_options["target"]`); one family when
  nothing is left to choose.
  """
  own = own_signal(traces)
  signals = (list(auto_signals(traces)) if signal == "auto" and "signal" not in fit_options
             else [fit_options.get("signal")])
  targets = (["agreement", "label"] if metric == "accuracy" and fit_options.get("target") is None
             else [fit_options.get("target")])
  families = {}
  for tgt in targets:
    for sig in signals:
      name = ", ".join([sig or own] + ([f"{tgt} loss"] if len(targets) > 1 else []))
      families[name] = {k: v for k, v in (("signal", sig), ("target", tgt)) if v is not None}
  return families


def budget(traces: Traces, max_loss: float = 0.01, *,
           folds: Optional[int] = None,
           test_fraction: float = 0.5,
           seed: int = 0,
           block: int = 1,
           lambdas=None,
           num_lambdas: int = NUM_LAMBDAS,
           fit_options: Optional[dict] = None,
           methods: Sequence[str] = METHODS,
           max_bytes: int = DEFAULT_MAX_BYTES,
           signal: Optional[str] = "auto",
           inner_folds: int = INNER_FOLDS,
           metric: str = "agreement") -> Budget:
  """Per method, the parameter with most speedup meeting an agreement (or accuracy) loss budget.

  The parameter is chosen on the fit rows (`1 - agreement <= max_loss` there,
  then most speedup) and reported on the fit rows and on the held-out rows;
  with `folds`, each fold chooses on its own fit rows and the held-out
  metrics pool the folds (cross-fitting). Apparate's greedy search is run
  with `max_loss` as its budget.

  The exit signal of the solver's model is chosen on the fit rows too: with
  `signal="auto"` (default, single split), an `inner_folds`-fold
  cross-fitting of the fit rows scores the traces' own signal (`1 - conf`,
  or `traces.signal`), `"stability"` (`1 - conf`, plus 1 where the
  prediction changed since the previous ramp) and `"class"` (a per-class
  logistic calibration of the ramp's agreement with the final ramp; see
  `jexit.fit`) by their mean held-out speedup at `max_loss`, and the best
  one (ties: in that order) is fitted on all fit rows
  (experiments/SELECT_FAMILY.md and experiments/CLASS.md measured it).
  `signal_scores` holds each candidate's score (with `metric="accuracy"`,
  candidates are named `"<signal>, <target> loss"`).

  Args:
    traces: the traces.
    max_loss: agreement-loss budget, e.g. 0.01 for 99% agreement.
    folds, test_fraction, seed, block, lambdas, num_lambdas, fit_options,
      methods, max_bytes: as for `frontier`.
    signal: `"auto"`, one of `"1-conf"`, `"stability"`, `"class"`,
      `"signal"` (no selection), or None (the traces' own, or `fit_options["signal"]`).
      `"auto"` selects only with a single split; with `folds` (and with fit
      rows too few to compare) it keeps the traces' own signal, and
      `signal_scores` is None.
    inner_folds: k of the inner cross-fitting for `signal="auto"`.
    metric: `"agreement"` (loss = 1 - agreement with the final ramp) or
      `"accuracy"` (loss = the backbone's accuracy on the same rows minus the
      policy's; needs labels; `max_loss < 0` asks for a gain). With
      `"accuracy"` and no `fit_options["target"]`, the inner cross-fitting
      also chooses the solver's loss: disagreement with the final ramp
      (`target="agreement"`) or error against the labels (`"label"`), with
      which a recall policy may answer with an earlier ramp that is more
      often right than the one it stopped at (experiments/RECALL.md measured
      both); with `folds` it keeps `"agreement"`. Apparate's greedy search
      runs its default budget grid (it measures agreement), chosen by accuracy.

  Returns:
    A `Budget`: `choices[method] = BudgetChoice(param, fit, test)`.

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.frontiers import budget
    >>> rng = np.random.default_rng(0)
    >>> conf = np.sort(rng.uniform(0.3, 1, (400, 3)), axis=1)
    >>> t = jexit.Traces(conf, rng.integers(0, 2, (400, 3)), None, np.ones(3))
    >>> b = budget(t, 0.05, num_lambdas=50, methods=("recall", "backbone"))
    >>> float(b.choices["backbone"].test.agreement[0])
    1.0
  """
  _check_metric(metric, max_loss)
  if signal is not None and signal not in SIGNAL_CHOICES:
    raise ValueError(f"signal: expected one of {list(SIGNAL_CHOICES)} or None, got {signal!r}")
  traces = check_traces(traces)
  fit_options = dict(fit_options or {})
  if metric == "accuracy" and traces.label is None:
    raise ValueError("metric: 'accuracy' needs traces with labels (traces.label is None)")
  if signal not in (None, "auto"):
    fit_options["signal"] = signal
  families = model_families(traces, fit_options, signal=signal, metric=metric)
  scores = None
  if len(families) > 1 and folds is None and any(m in methods for m in ("recall", "norecall")):
    chosen, scores = choose_family(traces, max_loss, families, test_fraction=test_fraction,
                                   seed=seed, block=block, fit_options=fit_options,
                                   num_lambdas=num_lambdas, inner_folds=inner_folds,
                                   max_bytes=max_bytes, metric=metric)
    if chosen is not None:
      fit_options.update(families[chosen])
  fr = frontier(traces, lambdas=lambdas, num_lambdas=num_lambdas,
                test_fraction=test_fraction, seed=seed, folds=folds, block=block,
                fit_options=fit_options, methods=methods,
                apparate_budgets=(max_loss,) if metric == "agreement" else APPARATE_BUDGETS,
                max_bytes=max_bytes, metric=metric)
  choices = choose(fr, max_loss, metric)
  return Budget(max_loss=float(max_loss), split=fr.split, choices=choices,
                fit_options=fr.fit_options, signal_scores=scores, metric=metric,
                best=best_method(choices))


# ---- JSON-ready dictionaries and text tables (the CLI writes and prints them)

def _num(x):
  if x is None:
    return None
  x = np.asarray(x)
  if x.ndim:
    return [_num(v) for v in x]
  v = x.item()
  if isinstance(v, float) and not np.isfinite(v):
    return None if np.isnan(v) else ("inf" if v > 0 else "-inf")
  return v


def metrics(evaluation: Evaluation, index: int = 0) -> dict:
  """`{"agreement", "accuracy", "mean_cost", "speedup"}` of one policy, JSON-ready."""
  get = lambda f: None if getattr(evaluation, f) is None else _num(
      np.asarray(getattr(evaluation, f))[index])
  return {"agreement": get("agreement"), "accuracy": get("accuracy"),
          "mean_cost": get("mean_cost"), "speedup": get("speedup")}


def frontier_to_dict(fr: Frontier, trace: Optional[str] = None, *,
                     all_points: bool = False) -> dict:
  """`{"trace", "split", "fit_options", "methods": {method: [entries]}}`.

  Each entry is `{"param", "agreement", "accuracy", "mean_cost", "speedup"}`
  on the test rows, for the method's Pareto points (chosen on the fit rows,
  ordered by cost) or, with `all_points`, for every parameter.
  """
  methods = {}
  for m, ev in fr.test.items():
    idx = np.arange(len(ev.agreement)) if all_points else np.flatnonzero(fr.pareto[m])
    idx = idx[np.argsort(np.asarray(fr.fit[m].mean_cost)[idx], kind="stable")]
    entries = []
    for i in idx:
      param = (_param_value(fr, m, 0, i) if m in ("recall", "norecall")
               else _num(np.asarray(ev.param)[i]))
      entries.append({"param": param, **metrics(ev, i)})
    methods[m] = entries
  return {"trace": trace, "split": dict(fr.split),
          "fit_options": {k: _num(v) if not isinstance(v, str) else v
                          for k, v in fr.fit_options.items()},
          "methods": methods}


def budget_to_dict(b: Budget, trace: Optional[str] = None) -> dict:
  """`{"trace", "metric", "max_loss", "split", "fit_options", "signal_scores",
  "best", "methods": {m: {"param", "fit", "test"}}}`."""
  methods = {}
  for m, c in b.choices.items():
    methods[m] = {"param": _num(c.param) if c.param is not None else None,
                  "fit": None if c.fit is None else metrics(c.fit),
                  "test": None if c.test is None else metrics(c.test)}
  return {"trace": trace, "metric": b.metric, "max_loss": b.max_loss, "split": dict(b.split),
          "fit_options": {k: _num(v) if not isinstance(v, str) else v
                          for k, v in b.fit_options.items()},
          "signal_scores": b.signal_scores, "best": b.best, "methods": methods}


def _fmt_param(p):
  if p is None:
    return "-"
  if isinstance(p, dict):
    return ", ".join(f"{k}={_fmt_param(v)}" for k, v in p.items())
  if isinstance(p, list):
    return "[" + ", ".join(_fmt_param(v) for v in p) + "]"
  if isinstance(p, float):
    return "inf" if p == np.inf else f"{p:.4g}"
  return str(p)


def _split_line(split: dict) -> str:
  if "folds" in split:
    return (f"{split['num_inputs']} inputs, {split['folds']}-fold cross-fitting "
            f"(seed {split['seed']}): parameters chosen on fit folds, metrics on held-out folds")
  return (f"{split['num_inputs']} inputs: {split['fit_rows']} fit / {split['test_rows']} "
          f"test rows (seed {split['seed']}): parameters chosen on fit rows, metrics on test rows")


def format_frontier(fr: Frontier, targets: Sequence[float] = TARGETS,
                    trace: Optional[str] = None) -> str:
  """A text table: per method and agreement-loss budget, the test speedup (agreement)
  of the parameter chosen on the fit rows for that budget."""
  lines = []
  if trace:
    lines.append(f"trace: {trace}")
  lines.append(_split_line(fr.split))
  lines.append("speedup on test rows (test agreement) at the parameter chosen on fit "
               "rows for each agreement-loss budget (apparate_greedy: the best run of "
               "its budget grid on fit rows)")
  head = f"{'method':<18}" + "".join(f"{'loss <= ' + format(t * 100, 'g') + '%':>20}"
                                     for t in targets)
  lines += [head, "-" * len(head)]
  chosen = [choose(fr, t) for t in targets]
  for m in fr.test:
    cells = []
    for c in chosen:
      ch = c[m]
      if ch.test is None:
        cells.append(f"{'-':>20}")
      else:
        s = f"{ch.test.speedup[0]:.2f}x ({ch.test.agreement[0] * 100:.1f}%)"
        cells.append(f"{s:>20}")
    lines.append(f"{m:<18}" + "".join(cells))
  best = [best_method(c) for c in chosen]
  show_best = sum(m in fr.test for m in DEPLOYABLE) > 1
  if show_best:
    cells = [f"{'-':>20}" if m is None else
             f"{c[m].test.speedup[0]:.2f}x ({c[m].test.agreement[0] * 100:.1f}%)".rjust(20)
             for m, c in zip(best, chosen)]
    lines.append(f"{'best (fit rows)':<18}" + "".join(cells))
  backbone = fr.model.cost.sum()
  lines.append(f"(speedup = total cost {backbone:.4g} / mean cost; oracle is a hindsight "
               f"bound, not a policy)")
  if show_best:
    lines.append("(best (fit rows): of " + ", ".join(m for m in DEPLOYABLE if m in fr.test)
                 + ", the one with the most fit speedup: "
                 + ", ".join(f"{m or '-'} at {t * 100:g}%" for m, t in zip(best, targets))
                 + "; `jexit budget` and `jexit export --max-loss` also choose the exit "
                   "signal first)")
  return "\n".join(lines)


def format_budget(b: Budget, trace: Optional[str] = None) -> str:
  """A text table of each method's chosen parameter with its fit and test metrics."""
  lines = []
  if trace:
    lines.append(f"trace: {trace}")
  lines.append(_split_line(b.split))
  if b.metric == "accuracy":
    lines.append(f"accuracy budget: at {'least' if b.max_loss < 0 else 'most'} "
                 f"{abs(b.max_loss) * 100:g}% {'above' if b.max_loss < 0 else 'below'} the "
                 f"backbone's accuracy on the fit rows (chosen on fit rows)")
  else:
    lines.append(f"agreement-loss budget: {b.max_loss * 100:g}% (chosen on fit rows)")
  if b.signal_scores:
    scores = ", ".join(f"{sig} {v:.2f}x" for sig, v in b.signal_scores.items())
    what = "exit signal" + (", loss target" if b.metric == "accuracy" else "")
    chosen = str(b.fit_options.get("signal"))
    if b.metric == "accuracy":
      chosen += f", {b.fit_options.get('target', 'agreement')} loss"
    lines.append(f"{what} of recall/norecall: {chosen} (chosen on fit rows by inner "
                 f"cross-fitting, mean held-out speedup: {scores})")
  # The budget's metric on fit and test rows, then the other one on test rows.
  score, other = (("accuracy", "agreement") if b.metric == "accuracy"
                  else ("agreement", "accuracy"))
  short = {"accuracy": "acc", "agreement": "agree"}
  head = (f"{'method':<18}{'param':>28}{'fit ' + short[score]:>11}{'fit speedup':>13}"
          f"{'test ' + short[score]:>12}{'test speedup':>14}{'test ' + short[other]:>12}")
  lines += [head, "-" * len(head)]
  pct = lambda ev, f: "-" if getattr(ev, f) is None else f"{getattr(ev, f)[0] * 100:.1f}%"
  for m, c in b.choices.items():
    if c.test is None:
      lines.append(f"{m:<18}{'no parameter meets the budget':>28}")
      continue
    param = _fmt_param(_num(c.param))
    if len(param) > 27:
      param = param[:24] + "..."
    lines.append(f"{m:<18}{param:>28}{pct(c.fit, score):>11}"
                 f"{c.fit.speedup[0]:>12.2f}x{pct(c.test, score):>12}"
                 f"{c.test.speedup[0]:>13.2f}x{pct(c.test, other):>12}")
  if b.best is not None:
    lines.append(f"best on the fit rows: {b.best} (most fit speedup of "
                 f"{', '.join(DEPLOYABLE)}; `jexit export --max-loss "
                 f"{b.max_loss:g}` ships it)")
  return "\n".join(lines)
