"""`jexit monitor` and `jexit refit`: watch a deployed policy, and refit it.

`jexit monitor POLICY COUNTERS...` tests the live counts that the runtimes
kept (`counters=True`, files merged by sum) against the reference counts the
policy file stores (`jexit.monitor.check`): per ramp a G-test of the bin
occupancy, the stop histogram, Holm-corrected, with total variation as the
effect size; and, from audited rows, Clopper-Pearson bounds on the live loss
against the budget. Exit code 0: ok; 1: drift or budget exceeded; 2: bad input.

`jexit refit POLICY COUNTERS... --out NEW` turns the audited rows (alone or
after an old trace) into a trace and runs the chooser again
(`jexit.select.choose`, as `jexit export --max-loss`), certified when asked.
docs/monitor.md walks through both.
"""

from typing import List

import numpy as np

from jexit import monitor
from jexit.counters import Counters
from jexit.runtime import ExitTable
from jexit.cli_args import _add_certify_args, _resolve_delta, _write_json


def add_parsers(sub) -> None:
  """Adds the `monitor` and `refit` subcommands to `jexit`'s subparsers."""
  p = sub.add_parser(
      "monitor", help="test live counters against the policy's reference (drift, budget)",
      description="Tests the counts a runtime kept while serving POLICY (counters=True; "
                  "several files are merged by sum) against the fit rows' counts stored "
                  "in POLICY: per ramp a G-test of the bin occupancy and one of the stop "
                  "histogram (Holm-corrected, with the total variation distance as effect "
                  "size), and from audited rows a Clopper-Pearson bound on the live loss "
                  "against the budget. Exit code 0: ok, 1: drift or budget exceeded, 2: "
                  "bad input.")
  p.add_argument("policy", help="policy file (.npz from jexit export)")
  p.add_argument("counters", nargs="+", help="counters file(s) (.npz, Counters.save)")
  p.add_argument("--alpha", type=float, default=monitor.DEFAULT_ALPHA,
                 help=f"level of each family of tests (drift; budget), default "
                      f"{monitor.DEFAULT_ALPHA:g}")
  p.add_argument("--min-effect", type=float, default=monitor.DEFAULT_MIN_EFFECT,
                 dest="min_effect",
                 help=f"smallest total variation distance that counts as drift (default "
                      f"{monitor.DEFAULT_MIN_EFFECT:g}; 0: any significant shift)")
  p.add_argument("--max-loss", type=float, default=None, dest="max_loss",
                 help="the disagreement budget to test (default: the policy's budget)")
  p.add_argument("--look", type=int, default=None, metavar="I",
                 help="this check's number (1 for the first) when the same stream is "
                      "checked again and again: the tests run at a spent level so that any "
                      "false alarm over all the checks has probability <= alpha "
                      "(docs/monitor.md)")
  p.add_argument("--looks", type=int, default=None, metavar="N",
                 help="with --look: the checks planned (level alpha/N each); without it "
                      "the level is alpha*6/(pi^2 I^2), for any number of checks")
  p.add_argument("--json", help="write the report as JSON here")
  p.add_argument("--plot", help="write live vs reference occupancy per ramp here (.png)")
  p.set_defaults(func=run_monitor)

  p = sub.add_parser(
      "refit", help="choose a new policy on audited rows (and an old trace)",
      description="Turns the audited rows of COUNTERS (inputs run to the final ramp "
                  "while POLICY served) into a trace, alone or after the rows of --trace, "
                  "and chooses a policy for the budget again, as `jexit export "
                  "--max-loss` does; the new file carries the new rows' reference counts.")
  p.add_argument("policy", help="the policy file that was served")
  p.add_argument("counters", nargs="+", help="counters file(s) with audited rows")
  p.add_argument("--trace", help="old trace .npz to append the audited rows to")
  p.add_argument("--out", required=True, help="policy file to write")
  p.add_argument("--max-loss", type=float, default=None, dest="max_loss",
                 help="disagreement budget (default: the policy's)")
  p.add_argument("--seed", type=int, default=0, help="seed of the fit split")
  p.add_argument("--grid", type=int, default=1000, help="lam values per candidate model")
  _add_certify_args(p, "Default: 0.1, as jexit export.")
  p.set_defaults(func=run_refit)


def _load(policy: str, paths: List[str]):
  """`(table, merged counters)`, refusing counters of another policy."""
  table = ExitTable.load(policy)
  counters = [Counters.load(path) for path in paths]
  digest = table.policy_sha256()
  for path, c in zip(paths, counters):
    if c.policy_sha256 != digest:
      raise ValueError(f"{path}: counts policy {c.policy_sha256!r}, not {policy} "
                       f"({digest[:12]}...); monitor the policy that was served")
  return table, sum(counters[1:], counters[0])


def _budget(table: ExitTable, max_loss):
  """The disagreement budget to test, or None (with why)."""
  if max_loss is not None:
    return max_loss, None
  b = table.budget
  if b is None:
    return None, "no budget in the policy file (pass --max-loss)"
  if b["metric"] != "agreement":
    return None, (f"the policy's budget is an {b['metric']} budget; audited rows carry no "
                  f"labels (pass --max-loss for a disagreement budget)")
  if not b["max_loss"] >= 0:
    return None, "a negative budget (a required gain) cannot be tested on audited rows"
  return float(b["max_loss"]), None


def _fmt_p(p: float) -> str:
  return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def format_report(r: monitor.Report, policy: str, note=None) -> str:
  """The lines `jexit monitor` prints."""
  lines = [f"{policy}: {r.num_inputs} live inputs vs {r.reference_inputs} reference rows; "
           f"alpha {r.alpha:g}"
           + ("" if r.look is None else
              f" spent over checks: check {r.look}"
              + ("" if r.looks is None else f" of {r.looks}")
              + f" at level {r.alpha_look:.3g}")
           + f", min effect (total variation) {r.min_effect:g}",
           f"{'test':<8} {'live':>8} {'ref':>8} {'G':>10} {'df':>4} {'p':>9} {'p_holm':>9} "
           f"{'TV':>6}  drift"]
  for name, t in [(f"ramp {k}", t) for k, t in enumerate(r.ramps)] + [("stops", r.stops)]:
    lines.append(f"{name:<8} {t.live:>8} {t.reference:>8} {t.statistic:>10.2f} {t.df:>4} "
                 f"{_fmt_p(t.p_value):>9} {_fmt_p(t.p_adjusted):>9} {t.effect:>6.3f}  "
                 f"{'DRIFT' if t.drift else '-'}")
  b = r.budget
  if b is None:
    lines.append(f"budget: not tested ({note})" if note else "budget: not tested")
  elif b.audited == 0:
    lines.append(f"budget {b.max_loss:g}: no audited inputs (serve with audit=p)")
  else:
    lines.append(
        f"budget {b.max_loss:g}: {b.disagree} of {b.audited} audited inputs disagree with the "
        f"final ramp ({b.rate:.4f}); one-sided {1 - (r.alpha_look or r.alpha):.4g} bounds "
        f"[{b.lower:.4f}, "
        f"{b.upper:.4f}], p-value of 'loss <= budget' {_fmt_p(b.p_value)}"
        + ("; EXCEEDED" if b.exceeded else
           "; the audit cannot vouch for the budget yet" if b.upper > b.max_loss else "; ok"))
  cert = r.certificate
  if cert is not None:
    lines.append(
        f"certificate: Pr(true {cert['quantity']} > {cert['eps']:g}) <= {cert['delta']:g} on "
        f"the fit-time law" if cert["certified"] else
        "certificate: none (the backbone was shipped)")
  if r.verdict == "drift":
    what = [f"ramp {k} (TV {r.ramps[k].effect:.3f})" for k in r.drifted]
    if r.stops.drift:
      what.append(f"stops (TV {r.stops.effect:.3f})")
    lines.append(f"verdict: drift: {', '.join(what)}")
  elif r.verdict == "budget exceeded":
    lines.append(f"verdict: budget exceeded: live loss >= {r.budget.lower:.4f} > "
                 f"{r.budget.max_loss:g}"
                 + (f" (drift at ramps {list(r.drifted)})" if r.drifted else ""))
  else:
    lines.append("verdict: ok")
  return "\n".join(lines)


def plot_occupancy(reference: monitor.Reference, counters: Counters, path: str,
                   report: monitor.Report) -> str:
  """Writes live vs reference bin occupancy (shares of the inputs that
  reached each ramp), one panel per ramp; returns `path`."""
  from jexit.plots import _figure  # pylint: disable=import-outside-toplevel
  k = reference.occupancy.shape[0]
  fig = _figure(figsize=(3.2 * k, 2.8), layout="constrained")
  axes = fig.subplots(1, k, squeeze=False)[0]
  s = np.arange(reference.occupancy.shape[1])
  for r, ax in enumerate(axes):
    ref, live = reference.occupancy[r], counters.occupancy[r]
    ax.bar(s - 0.2, ref / max(ref.sum(), 1), width=0.4, label="reference", color="0.6")
    ax.bar(s + 0.2, live / max(live.sum(), 1), width=0.4, label="live", color="C3")
    t = report.ramps[r]
    ax.set_title(f"ramp {r}: TV {t.effect:.3f}, p_holm {_fmt_p(t.p_adjusted)}"
                 + (" DRIFT" if t.drift else ""), fontsize=8)
    ax.set_xlabel("bin")
    if r == 0:
      ax.set_ylabel("share of inputs reaching the ramp")
      ax.legend(fontsize=7)
  fig.suptitle(f"verdict: {report.verdict}", fontsize=9)
  fig.savefig(path, dpi=110)
  return path


def run_monitor(args) -> int:
  """Runs `jexit monitor`; returns 0 (ok) or 1 (drift, budget exceeded)."""
  if not 0 < args.alpha < 1:
    raise ValueError(f"--alpha: expected a level in (0, 1), got {args.alpha}")
  if not 0 <= args.min_effect <= 1:
    raise ValueError(f"--min-effect: expected a total variation in [0, 1], got "
                     f"{args.min_effect}")
  for flag, v in (("--look", args.look), ("--looks", args.looks)):
    if v is not None and v < 1:
      raise ValueError(f"{flag}: expected an integer >= 1, got {v}")
  if args.looks is not None and args.look is None:
    raise ValueError(f"--looks: given ({args.looks}) without --look; pass --look I, the "
                     f"number of this check")
  if args.look is not None and args.looks is not None and args.look > args.looks:
    raise ValueError(f"--look: expected at most --looks = {args.looks}, got {args.look}")
  table, counters = _load(args.policy, args.counters)
  if table.reference is None:
    raise ValueError(f"{args.policy}: the policy file has no reference counts (exported by "
                     f"an older jexit?); export it again with jexit export")
  if args.max_loss is not None and not 0 <= args.max_loss <= 1:
    raise ValueError(f"--max-loss: expected a disagreement budget in [0, 1], got "
                     f"{args.max_loss}")
  eps, note = _budget(table, args.max_loss)
  occupancy, stops, n = table.reference
  reference = monitor.Reference(occupancy, stops, n, eps, table.certificate)
  report = monitor.check(reference, counters, alpha=args.alpha, min_effect=args.min_effect,
                         policy_sha256=table.policy_sha256(), look=args.look,
                         looks=args.looks)
  print(format_report(report, args.policy, note))
  if args.json:
    _write_json(args.json, {"policy": args.policy, "counters": list(args.counters),
                            "budget_note": note, **report.to_dict()})
  if args.plot:
    try:
      print(f"plot: {plot_occupancy(reference, counters, args.plot, report)}")
    except ImportError:
      print("(no plot: matplotlib is not installed; pip install 'jexit[plot]')")
  return report.exit_code


def refit_traces(table: ExitTable, counters: Counters, old=None):
  """The audited rows as `jexit.Traces` (costs from the table), after the
  rows of `old` (a `Traces` of the same K and costs) when given; labels are
  dropped (audited rows have none)."""
  from jexit.types import Traces  # pylint: disable=import-outside-toplevel
  rows = counters.audit_trace(cost=table.cost)
  conf, pred, signal = rows["conf"], rows["pred"], rows["signal"]
  if old is not None:
    if old.conf.shape[1] != table.num_ramps:
      raise ValueError(f"--trace: expected K={table.num_ramps} ramps like the policy, got "
                       f"{old.conf.shape[1]}")
    if not np.allclose(np.asarray(old.cost, np.float64), table.cost):
      raise ValueError(f"--trace: expected the policy's costs {table.cost.tolist()}, got "
                       f"{np.asarray(old.cost).tolist()}")
    if (old.signal is None) != (signal is None):
      raise ValueError("--trace: the old trace and the audited rows must both carry a custom "
                       "signal, or neither")
    conf = np.concatenate([np.asarray(old.conf, np.float64), conf])
    pred = np.concatenate([np.asarray(old.pred).astype(np.int64), pred])
    if signal is not None:
      signal = np.concatenate([np.asarray(old.signal, np.float64), signal])
  return Traces(conf=conf, pred=pred, label=None, cost=table.cost.copy(), signal=signal)


def run_refit(args) -> int:
  """Runs `jexit refit`; prints what was written."""
  from jexit import report as report_mod  # pylint: disable=import-outside-toplevel
  from jexit.export import add_reference, export_policy  # pylint: disable=import-outside-toplevel
  from jexit.select import DEPLOYABLE, choose  # pylint: disable=import-outside-toplevel
  from jexit.traces import check_traces, load_traces  # pylint: disable=import-outside-toplevel

  table, counters = _load(args.policy, args.counters)
  if not counters.audit_rows or counters.audited == 0:
    raise ValueError(f"{args.counters[0]}: no audited rows to refit on (serve with "
                     f"counters=True, audit=p)")
  eps, note = _budget(table, args.max_loss)
  if eps is None:
    raise ValueError(f"--max-loss: {note}")
  if not 0 < eps <= 1:
    raise ValueError(f"--max-loss: expected a disagreement budget in (0, 1], got {eps}")
  delta, cert_note = _resolve_delta(args, eps)
  old = load_traces(args.trace) if args.trace else None
  traces = check_traces(refit_traces(table, counters, old))
  audited = traces.num_inputs - (0 if old is None else old.num_inputs)
  print(f"refit on {traces.num_inputs} rows ({audited} audited"
        + (f" after {old.num_inputs} of {args.trace})" if old is not None else ")"))
  ship = ("recall",) + tuple(m for m in DEPLOYABLE if m != "recall")
  choice = choose(traces, eps, metric="agreement", methods=ship, ship=ship, signal="auto",
                  seed=args.seed, num_lambdas=args.grid, delta=delta,
                  calibration_share=args.calibration_share)
  if choice.table is None:
    raise ValueError(f"--max-loss: no policy reaches agreement >= {1 - eps:.4g} on the fit "
                     f"rows of the refit trace")
  t = choice.table
  export_policy(args.out, t.policy, t.binning, t.model, t.lam_index, traces=traces,
                budget={"max_loss": float(eps), "metric": "agreement"},
                certificate=report_mod.certificate_to_dict(
                    choice.certificate, method=choice.best or ship[0], metric="agreement"))
  header = add_reference(args.out, traces)
  print(report_mod.format_export(header, args.out, choice))
  if cert_note:
    print(cert_note)
  return 0
