"""The one chooser: traces and a loss budget in, a table to ship out.

`choose` makes every choice on fit rows (PROBLEM.md): the exit signal and
loss target of the solver's model (by an inner cross-fitting of the fit
rows), then, per method, the parameter with the most fit speedup that meets
the budget there, then the deployable method with the most fit speedup; it
reports each choice on the held-out rows and returns the table to ship.
`jexit budget`, `jexit export --max-loss` and `jexit demo` all call it.
"""

from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np

from jexit import baselines, certify, signals
from jexit.evaluation import DEFAULT_MAX_BYTES
from jexit.fit import MAX_CLASSES
from jexit.metrics import Evaluation, select
from jexit.protocol import (APPARATE_BUDGETS, METHODS, METRICS, NUM_LAMBDAS, Frontier,
                            candidate_policy, frontier, param_value, pool)
from jexit.select_certify import (CERTIFY_APPARATE_BUDGETS, PATH_CHUNK, _certified_split,
                                  certify_path, unit_losses)
from jexit.traces import check_traces, own_signal, row_blocks, split_rows
from jexit.types import Binning, ExitModel, Policy, Traces, is_real_scalar

def _check_metric(metric: str, max_loss: float):
  if metric not in METRICS:
    raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
  low = 0 if metric == "agreement" else -1
  if not is_real_scalar(max_loss) or not (np.isfinite(max_loss) and low <= max_loss <= 1):
    raise ValueError(f"max_loss: expected an {metric}-loss budget in [{low}, 1], got {max_loss!r}")


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


class MethodChoice(NamedTuple):
  """One method's parameter chosen on fit rows for an agreement-loss budget.

  Attributes:
    param: the chosen parameter (lam, a threshold, Apparate's per-ramp
      thresholds, ...); with folds, a list with one per fold. None when no
      parameter met the budget on the fit rows (of some fold).
    fit: `Evaluation [1]` on the fit rows (averaged over folds), or None.
    test: `Evaluation [1]` on the held-out rows (pooled over folds), or None.
    certificate: with a certified budget (`choose(..., delta=)`), the
      method's `certify.Certificate` (param, fit and test are then the
      certified parameter's; test: on the calibration rows) or
      `certify.Fallback` (nothing certified: param, fit and test are None);
      None when the method was not certified.
  """
  param: object
  fit: Optional[Evaluation]
  test: Optional[Evaluation]
  certificate: Optional[object] = None



# Methods whose chosen parameter `jexit export --max-loss` (method best, its
# default) can ship as a table, in the order that breaks ties of fit speedup.
DEPLOYABLE = ("recall", "norecall", "apparate_greedy", "global_threshold")


def best_method(choices: Dict[str, MethodChoice]) -> Optional[str]:
  """The deployable method whose chosen parameter has the most fit speedup.

  Chosen on the fit rows only (each choice already met the budget there).
  experiments/union.py measured this rule, after `choose`'s choice of the exit
  signal, with the quality protocol: at least as fast as the best external
  baseline on 31 of 32 held-out cells, against 19 for the recall policy alone,
  and on 32 of 32 averaged over five outer split seeds (experiments/reports/UNION.md).
  """
  best, speed = None, -np.inf
  for m in DEPLOYABLE:
    c = choices.get(m)
    if c is not None and c.fit is not None and float(c.fit.speedup[0]) > speed + 1e-12:
      best, speed = m, float(c.fit.speedup[0])
  return best


SIGNAL_CHOICES = ("auto",) + signals.NAMES


def auto_signals(traces: Traces) -> tuple:
  """The exit signals `signal="auto"` chooses among, ties to the first: the
  traces' own (`1 - conf`, or `traces.signal`), then `jexit.signals.AUTO`
  (`"stability"`, `"class"`; a signal with class weights only when the
  predictions are class ids in [0, MAX_CLASSES))."""
  pred = np.asarray(traces.pred)
  ids = pred.size and pred.min() >= 0 and pred.max() < MAX_CLASSES
  return (own_signal(traces),) + tuple(
      name for name in signals.AUTO if ids or not signals.REGISTRY[name].needs_calibration)


INNER_FOLDS = 4


def signal_score(traces: Traces, signal: str, max_loss: float, *, folds: int = INNER_FOLDS,
                 block: int = 1, fit_options: Optional[dict] = None,
                 num_lambdas: int = NUM_LAMBDAS, max_bytes: int = DEFAULT_MAX_BYTES,
                 metric: str = "agreement") -> float:
  """Mean held-out speedup of the recall policy at `max_loss` under k-fold
  cross-fitting of `traces` (the fit rows of an outer split) with this signal.

  Each fold chooses its parameter on its own fit rows (speedup 1, the
  backbone, when none meets the budget there), as `choose` does.
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


def per_method(fr: Frontier, max_loss: float,
               metric: str = "agreement") -> Dict[str, MethodChoice]:
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
      params.append(param_value(fr, method, i, idx))
      fits.append(select(fit_ev, [idx]))
      tests.append(select(test_ev, [idx]))
    if params is None:
      out[method] = MethodChoice(None, None, None)
      continue
    cost = fr.model.cost
    out[method] = MethodChoice(params[0] if len(params) == 1 else params,
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
  """The candidate model families `choose` chooses among: `{name: fit options}`.

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


class Table(NamedTuple):
  """The policy table a choice ships: entry `lam_index` of `policy`.

  Attributes:
    method: the method it comes from (`DEPLOYABLE`).
    policy: `Policy [L]`: the solved lam grid of the chosen candidate model,
      or the 2-bin table of a threshold rule (`L = 1`).
    lam_index: which entry of `policy` ships.
    binning: its `Binning`.
    model: the `ExitModel` it was solved from (None for threshold rules).
    index: the entry of the method's parameter grid on the frontier.
  """
  method: str
  policy: Policy
  lam_index: int
  binning: Binning
  model: Optional[ExitModel]
  index: int


class Choice(NamedTuple):
  """What `choose` decided for a loss budget, and on which evidence.

  Attributes:
    max_loss: the budget. metric: what it limits, `"agreement"` or `"accuracy"`.
    split: how rows were split (`Frontier.split`).
    choices: per method run, the parameter chosen on the fit rows and its
      fit and held-out metrics.
    fit_options: the model's `jexit.fit` options, with the chosen signal
      and loss target.
    signal_scores: per candidate model family (exit signal, and with
      `metric="accuracy"` loss target), its mean held-out speedup at
      `max_loss` in the inner cross-fitting of the fit rows; None when
      nothing was chosen that way.
    best: the method of `ship` with the most fit speedup among those whose
      parameter met the budget (None if none did).
    table: the table to ship (None with folds, or when nothing met the budget).
      With `delta`, the certified parameter of `best`'s path, or the
      backbone (method `"backbone"`, never exits early) when nothing certified.
    frontier: the `Frontier` the choices were made on.
    delta: the failure probability of a certified budget, or None.
    certificate: with `delta`, the shipped table's `certify.Certificate`, or
      the `certify.Fallback` record when the backbone ships.
    uncertified: with `delta`, the per-method choices on the fit rows before
      certification (what the same split chooses without `delta`).
  """
  max_loss: float
  split: dict
  choices: Dict[str, MethodChoice]
  fit_options: dict
  signal_scores: Optional[Dict[str, float]] = None
  metric: str = "agreement"
  best: Optional[str] = None
  table: Optional[Table] = None
  frontier: Optional[Frontier] = None
  delta: Optional[float] = None
  certificate: Optional[object] = None
  uncertified: Optional[Dict[str, MethodChoice]] = None


def _table(fr: Frontier, method: str, max_loss: float, metric: str) -> Optional[Table]:
  """The table of `method`'s parameter chosen on the (single) split's fit rows."""
  fit_ev = fr.splits[0][method][0]
  ref = fr.backbone_fit_accuracy[0] if metric == "accuracy" else 1.0
  i = choose_index(fit_ev, max_loss, metric=metric, reference=ref)
  if i is None:
    return None
  return _table_at(fr, method, i)


def _table_at(fr: Frontier, method: str, i: int) -> Table:
  """The table of entry `i` of `method`'s parameter grid on the first split."""
  if method in ("recall", "norecall"):
    policy, lam_index, model, binning = candidate_policy(fr, method, i)
    return Table(method, policy, lam_index, binning, model, i)
  param = param_value(fr, method, 0, i)
  thresholds = param + [0.0] if isinstance(param, list) else param  # the last ramp exits
  policy, binning = baselines.threshold_policy(thresholds, fr.model.cost)
  return Table(method, policy, 0, binning, None, i)


def choose(traces: Traces, max_loss: float = 0.01, *,
           metric: str = "agreement",
           methods: Sequence[str] = METHODS,
           ship: Optional[Sequence[str]] = None,
           signal: Optional[str] = "auto",
           folds: Optional[int] = None,
           test_fraction: Optional[float] = None,
           seed: int = 0,
           block: int = 1,
           lambdas=None,
           num_lambdas: int = NUM_LAMBDAS,
           fit_options: Optional[dict] = None,
           max_bytes: int = DEFAULT_MAX_BYTES,
           inner_folds: int = INNER_FOLDS,
           apparate_budgets: Optional[Sequence[float]] = None,
           delta: Optional[float] = None,
           calibration_share: Optional[float] = None,
           certify_test: Optional[str] = None) -> Choice:
  """Chooses, on fit rows, the table to ship for a loss budget; reports it held out.

  In order, every choice made on the fit rows of one seeded split (or of each
  fold, with `folds`):
  1. the solver's model family: with `signal="auto"` (single split), an
     `inner_folds`-fold cross-fitting of the fit rows scores the traces' own
     signal (`1 - conf`, or `traces.signal`), `"stability"` and `"class"`
     (and, with `metric="accuracy"`, the loss target `"agreement"` or
     `"label"`) by the recall policy's mean held-out speedup at `max_loss`;
     the best (ties: in that order) is fitted on all fit rows
     (experiments/reports/SELECT_FAMILY.md, CLASS.md and RECALL.md measured it);
  2. per method of `methods`, the parameter with the most fit speedup whose
     fit loss is within `max_loss` (`per_method`);
  3. of the methods in `ship`, the one with the most fit speedup (`best`;
     experiments/reports/UNION.md measured the rule), whose table is `table`.

  Certified budgets (`delta`; docs/certify.md, experiments/reports/CERTIFIED.md;
  the rules, `certify_path` and the others below: `jexit.select_certify`).
  The held-out rows are then calibration rows (a `calibration_share` of the
  blocks) that the fit and every choice above never see. After steps 1-3,
  each deployable method's candidates are ordered from safest to fastest
  before any calibration row is read (`certify_path`: the lam path, lam
  increasing, of the candidate model chosen on the fit rows; the threshold
  grid; Apparate's budget grid) and certified by fixed-sequence testing on
  the calibration rows (`certify.certify_units`, the test by
  `default_certify_test`): the last accepted candidate has
  `Pr(true loss > max_loss) <= delta` over the draw of the calibration
  rows. The table shipped is `best`'s (or `ship[0]`'s) certified candidate. The guarantee survives every choice among signals, families
  and methods because all of them are made on the fit rows, before the
  calibration rows are read, and only one path (`best`'s) is certified for
  shipping: conditional on the fit rows, that path is fixed and the
  calibration rows are a fresh sample (the other methods' certificates are
  reported for comparison, each valid on its own, never used to choose).
  When the path's safest candidate fails, nothing is certified: the table is
  the backbone (it never exits early) and `certificate` a `certify.Fallback`
  naming the units `max_loss` needs and the smallest budget these rows can
  certify; never an uncertified table.

  What is certified (`CERTIFIED_LOSS`): with `metric="agreement"` the
  disagreement rate, 1 - agreement with the final ramp, on new inputs; with
  `metric="accuracy"` the harm rate, the share of new inputs that the final
  ramp gets right and the table gets wrong. The harm rate bounds the
  accuracy loss relative to the backbone's true accuracy from above (the
  loss is harm minus the inputs the table gets right and the final ramp
  wrong); a budget relative to the accuracy on some rows is not a fixed
  quantity and is not what is certified. A required gain (`max_loss <= 0`)
  cannot be certified.

  Args:
    traces: the traces.
    max_loss: the loss budget, e.g. 0.01.
    metric: `"agreement"` (loss = 1 - agreement with the final ramp) or
      `"accuracy"` (loss = the backbone's accuracy on the same rows minus the
      policy's; needs labels; `max_loss < 0` asks for a gain).
    methods: which of `METHODS` to run and report.
    ship: which methods may be shipped, a subset of `DEPLOYABLE` and of
      `methods` (default: every deployable method run). When none met the
      budget, `table` is `ship[0]`'s choice: None.
    signal: `"auto"`, one of `jexit.signals.NAMES` (no selection), or None
      (the traces' own, or `fit_options["signal"]`). `"auto"` selects only
      with a single split; with `folds` (and with fit rows too few to
      compare) it keeps the traces' own signal.
    folds, test_fraction, seed, block, lambdas, num_lambdas, fit_options,
      max_bytes: as for `jexit.protocol.frontier` (`test_fraction` default
      0.5; not with `delta`, whose held-out rows are the calibration rows).
    inner_folds: k of the inner cross-fitting of step 1.
    apparate_budgets: the budget grid of Apparate's greedy search (default:
      `(max_loss,)` for agreement, `APPARATE_BUDGETS` for accuracy; with
      `delta`, `CERTIFY_APPARATE_BUDGETS` and `max_loss`, so that its path
      has steps near every budget).
    delta: certify the budget at this failure probability in (0, 1); None
      (default): the budget holds on the fit rows only.
    calibration_share: with `delta`, the share of the blocks held out for
      calibration (default `auto_calibration_share`: 0.5, or 0.7 when 0.5
      leaves fewer than twice the units `max_loss` needs).
    certify_test: with `delta`, one of `certify.UNIT_TESTS` (default
      `default_certify_test`: the exact `"binomial"` for independent rows,
      `block == 1`; for blocks of related rows the betting test `"wsr"` on
      block means, or `"hoeffding-bentkus"` when the units are fewer than the
      betting test needs).

  Returns:
    A `Choice`.

  Examples:
    >>> import numpy as np, jexit
    >>> rng = np.random.default_rng(0)
    >>> conf = np.sort(rng.uniform(0.3, 1, (400, 3)), axis=1)
    >>> t = jexit.Traces(conf, rng.integers(0, 2, (400, 3)), None, np.ones(3))
    >>> c = jexit.choose(t, 0.05, num_lambdas=50, methods=("recall", "backbone"),
    ...                  ship=("recall",))
    >>> float(c.choices["backbone"].test.agreement[0])
    1.0
  """
  _check_metric(metric, max_loss)
  if signal is not None and signal not in SIGNAL_CHOICES:
    raise ValueError(f"signal: expected one of {list(SIGNAL_CHOICES)} or None, got {signal!r}")
  traces = check_traces(traces)
  if metric == "accuracy" and traces.label is None:
    raise ValueError("metric: 'accuracy' needs traces with labels (traces.label is None)")
  if delta is None:
    for name, value in (("calibration_share", calibration_share),
                        ("certify_test", certify_test)):
      if value is not None:
        raise ValueError(f"{name}: only for a certified budget (delta), got {value!r} "
                         f"with delta=None")
    test_fraction = 0.5 if test_fraction is None else test_fraction
  else:
    certify_test, test_fraction = _certified_split(
        traces, max_loss, delta, folds=folds, test_fraction=test_fraction, block=block,
        calibration_share=calibration_share, certify_test=certify_test)
    if apparate_budgets is None:
      apparate_budgets = tuple(sorted(set(CERTIFY_APPARATE_BUDGETS) | {float(max_loss)}))
  methods = tuple(methods)
  ship = tuple(m for m in DEPLOYABLE if m in methods) if ship is None else tuple(ship)
  if any(m not in DEPLOYABLE or m not in methods for m in ship):
    raise ValueError(f"ship: expected a subset of {list(DEPLOYABLE)} that `methods` runs, "
                     f"got {list(ship)}")
  if fit_options is not None and not isinstance(fit_options, dict):
    raise ValueError(f"fit_options: expected a dict of jexit.fit arguments, got "
                     f"{type(fit_options).__name__}")
  fit_options = dict(fit_options or {})
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
  if apparate_budgets is None:
    apparate_budgets = (max_loss,) if metric == "agreement" else APPARATE_BUDGETS
  fr = frontier(traces, lambdas=lambdas, num_lambdas=num_lambdas,
                test_fraction=test_fraction, seed=seed, folds=folds, block=block,
                fit_options=fit_options, methods=methods, apparate_budgets=apparate_budgets,
                max_bytes=max_bytes, metric=metric)
  choices = per_method(fr, max_loss, metric)
  best = best_method({m: choices[m] for m in ship})
  table = certificate = uncertified = None
  if delta is not None:
    uncertified = choices
    choices = certify_choices(traces, fr, choices, max_loss, delta, metric=metric,
                              test=certify_test, seed=seed)
    if ship:
      certificate = choices[best or ship[0]].certificate
      table = (_table_at(fr, best or ship[0], certificate.index)
               if isinstance(certificate, certify.Certificate) else backbone_table(traces.cost))
  elif folds is None and ship:
    table = _table(fr, best or ship[0], max_loss, metric)
  split = fr.split if delta is None else dict(fr.split, calibration_share=float(test_fraction))
  return Choice(max_loss=float(max_loss), split=split, choices=choices,
                fit_options=fr.fit_options, signal_scores=scores, metric=metric,
                best=best, table=table, frontier=fr,
                delta=None if delta is None else float(delta), certificate=certificate,
                uncertified=uncertified)


# ---- certified budgets (choose(..., delta=); docs/certify.md; rules in jexit.select_certify)

def certify_choices(traces: Traces, fr: Frontier, choices: Dict[str, MethodChoice],
                    max_loss: float, delta: float, *, metric: str = "agreement",
                    test: str = "binomial", seed: int = 0) -> Dict[str, MethodChoice]:
  """Each deployable method's certified choice on the first split's held-out
  (calibration) rows: `certify_path`'s order, `certify.certify_units`.

  Methods that are not deployable are returned as they were (not certified).
  """
  block = int(fr.split["block"])
  cal_rows = split_rows(traces.num_inputs, test_fraction=fr.split["test_fraction"],
                        seed=fr.split["seed"], block=block)[1]
  out = {}
  for m, c in choices.items():
    if m not in DEPLOYABLE:
      out[m] = c
      continue
    ref = fr.backbone_fit_accuracy[0] if metric == "accuracy" else 1.0
    idx = certify_path(fr, m, choose_index(fr.splits[0][m][0], max_loss, metric=metric,
                                           reference=ref))
    # Walk the path in chunks and stop after the first rejection: the walk
    # reads no further, and memory stays at a chunk of candidates x rows.
    parts, cache = [], {}
    for start in range(0, len(idx), PATH_CHUNK):
      part = unit_losses(fr, m, idx[start:start + PATH_CHUNK], traces, cal_rows,
                         metric=metric, block=block, cache=cache)
      parts.append(part)
      if np.any(certify.unit_pvalues(part, max_loss, delta, test, seed=seed) > delta):
        break
    losses = (np.concatenate(parts) if parts
              else np.zeros((0, len(np.unique(cal_rows // block)))))
    cert = certify.certify_units(losses, max_loss, delta, test=test, index=idx[:len(losses)],
                                 rows=cal_rows, block=block, seed=seed)
    if isinstance(cert, certify.Certificate):
      fit_ev, test_ev = fr.splits[0][m]
      out[m] = MethodChoice(param_value(fr, m, 0, cert.index), select(fit_ev, [cert.index]),
                            select(test_ev, [cert.index]), cert)
    else:
      out[m] = MethodChoice(None, None, None, cert)
  return out


def backbone_table(cost) -> Table:
  """The table shipped when nothing certifies: it never exits before the last ramp."""
  policy, binning = baselines.backbone_policy(cost)
  return Table("backbone", policy, 0, binning, None, 0)
