"""Reports of frontiers, choices and ramp placements: JSON-ready dictionaries and text tables.

The command line prints and writes what these return; nothing here computes
a decision.
"""

from typing import Optional, Sequence

import numpy as np

from jexit import certify
from jexit.metrics import Evaluation
from jexit.place import Placement
from jexit.protocol import Frontier, param_value
from jexit.select import DEPLOYABLE, Choice, best_method, per_method
from jexit.select_certify import CERTIFIED_LOSS
from jexit.subsets import backbone_cost

TARGETS = (0.005, 0.01, 0.02, 0.05)  # the loss budgets a frontier table shows


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
      param = (param_value(fr, m, 0, i) if m in ("recall", "norecall")
               else _num(np.asarray(ev.param)[i]))
      entries.append({"param": param, **metrics(ev, i)})
    methods[m] = entries
  return {"trace": trace, "split": dict(fr.split),
          "fit_options": {k: _num(v) if not isinstance(v, str) else v
                          for k, v in fr.fit_options.items()},
          "methods": methods}


def certificate_to_dict(cert, *, method: Optional[str] = None,
                        metric: str = "agreement") -> Optional[dict]:
  """A `certify.Certificate` or `certify.Fallback` as the JSON object that
  `jexit budget --json` and the policy file carry (`jexit.policy_file.check_certificate`):
  its fields, plus `certified` (bool), `method` (whose candidate path was
  tested) and `quantity` (the per-row loss certified, `select_certify.CERTIFIED_LOSS`)."""
  if cert is None:
    return None
  return {"certified": isinstance(cert, certify.Certificate), **cert.to_dict(),
          "method": method, "quantity": CERTIFIED_LOSS[metric]}


def choice_to_dict(b: Choice, trace: Optional[str] = None) -> dict:
  """`{"trace", "metric", "max_loss", "delta", "split", "fit_options",
  "signal_scores", "best", "certificate", "shipped", "methods": {m: {"param",
  "fit", "test", "certificate"}}, "uncertified"}`: with a certified budget
  (`delta`), "test" is on the calibration rows, "certificate" the shipped
  table's (`certificate_to_dict`), "shipped" the method of the table
  ("backbone" when nothing certified), "uncertified" the fit-row choices
  before certification."""
  def entries(choices):
    out = {}
    for m, c in choices.items():
      out[m] = {"param": _num(c.param) if c.param is not None else None,
                "fit": None if c.fit is None else metrics(c.fit),
                "test": None if c.test is None else metrics(c.test),
                "certificate": certificate_to_dict(c.certificate, method=m, metric=b.metric)}
    return out
  chosen = _certified_method(b)
  return {"trace": trace, "metric": b.metric, "max_loss": b.max_loss, "delta": b.delta,
          "split": dict(b.split),
          "fit_options": {k: _num(v) if not isinstance(v, str) else v
                          for k, v in b.fit_options.items()},
          "signal_scores": b.signal_scores, "best": b.best,
          "certificate": certificate_to_dict(b.certificate, method=chosen, metric=b.metric),
          "shipped": None if b.table is None else b.table.method,
          "methods": entries(b.choices),
          "uncertified": None if b.uncertified is None else entries(b.uncertified)}


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
  if "calibration_share" in split:
    blocks = f" in blocks of {split['block']}" if split.get("block", 1) > 1 else ""
    return (f"{split['num_inputs']} inputs{blocks}: {split['fit_rows']} fit / "
            f"{split['test_rows']} calibration rows (seed {split['seed']}, calibration share "
            f"{split['calibration_share']:g}): every choice on the fit rows, certificates on "
            f"the calibration rows")
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
  chosen = [per_method(fr, t) for t in targets]
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


def format_choice(b: Choice, trace: Optional[str] = None) -> str:
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
  if b.delta is not None:
    lines.append(f"certified at delta {b.delta:g}: each deployable method's candidates, "
                 f"ordered safest to fastest on the fit rows, tested in that order on the "
                 f"calibration rows; the last accepted has Pr(true {CERTIFIED_LOSS[b.metric]} "
                 f"> {b.max_loss * 100:g}%) <= {b.delta:g}")
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
  held = "cal" if b.delta is not None else "test"
  head = (f"{'method':<18}{'param':>28}{'fit ' + short[score]:>11}{'fit speedup':>13}"
          f"{held + ' ' + short[score]:>12}{held + ' speedup':>14}{held + ' ' + short[other]:>12}")
  if b.delta is not None:
    head += f"{'bound':>9}"
  lines += [head, "-" * len(head)]
  pct = lambda ev, f: "-" if getattr(ev, f) is None else f"{getattr(ev, f)[0] * 100:.1f}%"
  for m, c in b.choices.items():
    if c.test is None:
      why = ("nothing certified: backbone" if isinstance(c.certificate, certify.Fallback)
             else "no parameter meets the budget")
      lines.append(f"{m:<18}{why:>28}")
      continue
    param = _fmt_param(_num(c.param))
    if len(param) > 27:
      param = param[:24] + "..."
    line = (f"{m:<18}{param:>28}{pct(c.fit, score):>11}"
            f"{c.fit.speedup[0]:>12.2f}x{pct(c.test, score):>12}"
            f"{c.test.speedup[0]:>13.2f}x{pct(c.test, other):>12}")
    if b.delta is not None:
      line += (f"{c.certificate.ucb * 100:>8.2f}%" if c.certificate is not None
               else f"{'-':>9}")
    lines.append(line)
  if b.delta is not None:
    lines.append(f"(cal: on the calibration rows, which chose the certified parameter; bound: "
                 f"the upper {1 - b.delta:.0%} confidence bound of its true "
                 f"{CERTIFIED_LOSS[b.metric]}; '-': not certified)")
  if b.best is not None:
    lines.append(f"best on the fit rows: {b.best} (most fit speedup of "
                 f"{', '.join(DEPLOYABLE)}; `jexit export --max-loss "
                 f"{b.max_loss:g}` ships it" + (" certified)" if b.delta is not None else ")"))
  if b.delta is not None:
    lines += format_certificate(b).split("\n")
  return "\n".join(lines)


def _certified_method(b: Choice) -> Optional[str]:
  """The method whose path the shipped certificate (or fallback) is about."""
  if b.certificate is None:
    return None
  return next((m for m, c in b.choices.items() if c.certificate is b.certificate), None)


_TEST_NAMES = {"binomial": "exact binomial test", "hoeffding-bentkus": "Hoeffding-Bentkus test",
               "wsr": "Waudby-Smith-Ramdas betting test"}


def _units_text(cert) -> str:
  units = (f"{cert.units} calibration rows" if cert.block == 1 else
           f"{cert.units} calibration blocks of {cert.block} rows ({cert.rows} rows)")
  return units + (f", sha256 {cert.rows_sha256[:12]}" if cert.rows_sha256 else "")


def format_certificate(b: Choice) -> str:
  """What a certified budget shipped, in words: the certificate of the table,
  or why nothing certified and what would (empty without `delta`)."""
  cert = b.certificate
  if b.delta is None or cert is None:
    return ""
  loss, eps = CERTIFIED_LOSS[b.metric], b.max_loss
  method = _certified_method(b)
  unit = "rows" if cert.block == 1 else "blocks"
  if isinstance(cert, certify.Certificate):
    c = b.choices[method]
    return (f"certificate: {method} {_fmt_param(_num(c.param))}: speedup "
            f"{float(c.test.speedup[0]):.2f}x, {loss} "
            f"{cert.loss * 100:.2f}% on {_units_text(cert)}; upper {1 - cert.delta:.0%} "
            f"bound {cert.ucb * 100:.2f}%, p-value {cert.pvalue:.3g} <= delta {cert.delta:g} "
            f"({_TEST_NAMES[cert.test]}, {cert.accepted} candidates accepted in order): "
            f"Pr(true {loss} > {eps * 100:g}%) <= {cert.delta:g}")
  safest = ("its path is empty" if cert.loss is None else
            f"its safest candidate has {loss} {cert.loss * 100:.2f}% (upper bound "
            f"{cert.ucb * 100:.2f}%, p-value {cert.pvalue:.3g} > {cert.delta:g})")
  return (f"certificate: none. Nothing on {method}'s path certifies {eps * 100:g}% at delta "
          f"{cert.delta:g} on {_units_text(cert)} ({_TEST_NAMES[cert.test]}): {safest}. "
          f"{eps * 100:g}% needs at least {cert.needed_units} {unit} even with no loss; "
          f"these {cert.units} {unit} can certify at best {cert.smallest_certifiable * 100:.2f}%."
          f"\nships the backbone (it never exits early). To certify: more rows, a larger "
          f"budget or calibration share, or --delta none (the budget then holds on the fit "
          f"rows only)")


def format_export(header: dict, path: str, choice: Optional[Choice] = None) -> str:
  """The line `jexit export` prints: what was written and, for a budget, how
  it was chosen and what it did on the held-out rows."""
  line = (f"wrote {path}: K={header['num_ramps']} S={header['num_bins']} "
          f"lam={header['lam']:.6g} recall={header['recall']} signal={header['signal']}")
  if choice is None:
    return line + " (fitted on all of TRACE)"
  if choice.delta is not None:
    return _format_certified_export(path, line, choice)
  table, score = choice.table, choice.metric
  fit_ev, test_ev = (choice.frontier.splits[0][table.method][j] for j in (0, 1))
  i, split = table.index, choice.split
  rivals = len([m for m in choice.choices if m in DEPLOYABLE]) > 1
  return (line + f"; {table.method}" + (" (best on the fit rows)" if rivals else "")
          + f", chosen on {split['fit_rows']} fit rows ({score} "
          f"{float(getattr(fit_ev, score)[i]):.4f}, speedup {float(fit_ev.speedup[i]):.2f}x), "
          f"held-out {split['test_rows']} rows: {score} "
          f"{float(getattr(test_ev, score)[i]):.4f}, speedup {float(test_ev.speedup[i]):.2f}x")


def _format_certified_export(path: str, line: str, choice: Choice) -> str:
  table, score, split = choice.table, choice.metric, choice.split
  if table.method == "backbone":
    return (f"wrote {path}: the backbone (never exits early), K={table.policy.cost.shape[-1]}"
            f"\n" + format_certificate(choice))
  c = choice.choices[table.method]
  rivals = len([m for m in choice.choices if m in DEPLOYABLE]) > 1
  return (line + f"; {table.method}" + (" (best on the fit rows)" if rivals else "")
          + f", certified on {split['test_rows']} calibration rows ({score} "
          f"{float(getattr(c.test, score)[0]):.4f}, speedup {float(c.test.speedup[0]):.2f}x; "
          f"fit rows {float(getattr(c.fit, score)[0]):.4f}, {float(c.fit.speedup[0]):.2f}x)"
          f"\n" + format_certificate(choice))


# ----------------------------------------------------------- ramp placement

def placement_to_dict(res: Placement, trace: Optional[str] = None) -> dict:
  """JSON-ready summary: per budget the choice and the comparisons, the
  frontier across subsets, the split and the timings."""
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
