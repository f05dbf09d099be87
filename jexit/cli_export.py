"""`jexit export`: fit, solve and write one exit policy for deployment (docs/serve.md).

  jexit export TRACE --lam X --out POLICY.npz            the policy for one cost weight
  jexit export TRACE --max-loss Y [--metric M] [--delta D] --out POLICY.npz
                                                         the chooser's table for a budget
  jexit export TRACE --max-loss Y --place [--max-ramps M] --out POLICY.npz

With `--max-loss` the table is `jexit.select.choose`'s (as `jexit budget`),
certified at `--delta` (default `jexit.cli_args.DEFAULT_DELTA`); `--place` hands over
to `jexit.cli_place.run_export_place`. Errors are ValueErrors; `jexit.cli.main`
prints them as one `jexit: error: ...` line and exits with 2.
"""

import argparse

import numpy as np

from jexit import cli_place
from jexit.checks import check_output_path
from jexit.signals import NAMES as SIGNALS
from jexit.cli_args import (DEFAULT_DELTA, _add_certify_args, _resolve_delta,
                            signal_range_arg)


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `jexit export TRACE (--lam X | --max-loss Y) --out FILE`."""
  p = subparsers.add_parser(
      "export", help="fit, solve and export one exit policy for deployment",
      description="Fits the exit model, solves it and writes one policy table (.npz, "
                  "format jexit-policy v1) that jexit.runtime.ExitTable and "
                  "jexit.runtime_torch.EarlyExitRunner load. With --lam: jexit.fit's "
                  "defaults on all of TRACE. With --max-loss: as `jexit budget`, the "
                  "policy is chosen on a seeded fit split and its held-out metrics are "
                  "printed; the exported model is the one fitted on the fit rows.")
  p.add_argument("trace", help="trace .npz (conf, pred, cost[, label, signal])")
  choose = p.add_mutually_exclusive_group(required=True)
  choose.add_argument("--lam", type=float,
                      help="the cost weight lam to solve for")
  choose.add_argument("--max-loss", type=float, dest="max_loss",
                      help="agreement-loss budget (e.g. 0.01): export the policy with "
                           "the most speedup on the fit rows whose agreement loss there "
                           "is at most this (jexit.protocol.DEFAULT_FIT candidates)")
  p.add_argument("--metric", choices=("agreement", "accuracy"), default="agreement",
                 help="what --max-loss limits: agreement with the final ramp (default) or "
                      "accuracy against the labels relative to the backbone, as `jexit "
                      "budget --metric`; accuracy fits the loss to the labels")
  p.add_argument("--out", required=True, help="policy file to write")
  p.add_argument("--no-recall", action="store_true", dest="no_recall",
                 help="solve the no-recall policy (output = the stopping ramp)")
  p.add_argument("--method", choices=("best", "solver"), default=None,
                 help="with --max-loss: 'best' (default) exports whichever of the solved "
                      "policy with and without recall, Apparate's greedy per-ramp "
                      "thresholds and the global threshold has the most speedup on the fit "
                      "rows, as `jexit budget` reports it (thresholds become a 2-bin table; "
                      "experiments/reports/UNION.md measured the rule); 'solver' exports the solved "
                      "policy (with --lam, always)")
  p.add_argument("--paper", action="store_true",
                 help="the paper's model: uniform 0.08 bins, loss = 1 - conf")
  p.add_argument("--seed", type=int, default=0, help="seed of the fit split (--max-loss)")
  p.add_argument("--block", type=int, default=1,
                 help="split rows in blocks of this many related rows (--max-loss)")
  p.add_argument("--grid", type=int, default=1000,
                 help="lam values per candidate model tried by --max-loss (default 1000)")
  p.add_argument("--signal", choices=("auto",) + SIGNALS,
                 default=None,
                 help="exit signal of the model: 1-conf, stability (1 - conf, plus 1 where "
                      "the prediction changed since the previous ramp), class (a "
                      "per-class calibration of 1 - conf, shipped in the table), the "
                      "trace's signal, or auto (chosen on the fit rows by inner cross-fitting, as "
                      "`jexit budget`; --max-loss only). Default: auto with --max-loss, "
                      "else 1-conf (the trace's signal if it has one)")
  p.add_argument("--signal-range", type=signal_range_arg, dest="signal_range", default=None,
                 help="LO,HI: the whole range of the trace's own signal, the outer bin edges "
                      "(default: the fit rows' range; e.g. 0,1 for a margin, so the runtime "
                      "serves held-out values beyond it)")
  _add_certify_args(p, f"Default with --max-loss: {DEFAULT_DELTA:g}; the certificate (or, "
                       f"when nothing certifies, the backbone and why) goes into the file.")
  p.add_argument("--place", action="store_true",
                 help="with --max-loss: also choose which candidate ramps to deploy (jexit "
                      "place; the table lists active_ramps)")
  cli_place.add_placement_args(p)
  p.set_defaults(func=run_export)
  return p


def run_export(args) -> int:
  """Runs `jexit export` from parsed `args`; prints one summary line."""
  # The solver side needs JAX; keep it off this module's import.
  from jexit import report, signals  # pylint: disable=import-outside-toplevel
  from jexit.export import add_reference, export_policy  # pylint: disable=import-outside-toplevel
  from jexit.fit import fit  # pylint: disable=import-outside-toplevel
  from jexit.protocol import PAPER_FIT  # pylint: disable=import-outside-toplevel
  from jexit.select import DEPLOYABLE, choose  # pylint: disable=import-outside-toplevel
  from jexit.solver import solve  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel

  delta, note = _resolve_delta(args, args.max_loss, lam=args.lam)
  check_output_path("--out", args.out)
  traces = load_traces(args.trace)
  if getattr(args, "place", False):
    from jexit.cli_place import run_export_place  # pylint: disable=import-outside-toplevel
    run_export_place(args, traces, delta)
    if note:
      print(note)
    return 0
  recall = not args.no_recall
  options = dict(PAPER_FIT) if args.paper else {}
  signal = args.signal or ("auto" if args.max_loss is not None else None)
  if signal == "auto" and args.lam is not None:
    raise ValueError("--signal auto chooses on a fit split; it needs --max-loss")
  if signal not in (None, "auto"):
    options["signal"] = signal
  if args.signal_range is not None:
    options["signal_range"] = args.signal_range
  if args.metric == "accuracy":
    if args.lam is not None:
      raise ValueError("--metric accuracy chooses on a fit split; it needs --max-loss")
    if traces.label is None:
      raise ValueError("--metric accuracy: the trace has no 'label' array")
  if args.method == "best" and args.lam is not None:
    raise ValueError("--method best chooses on a fit split; it needs --max-loss")
  if args.lam is not None:
    if not (np.isfinite(args.lam) and args.lam >= 0):
      raise ValueError(f"--lam: expected a finite value >= 0, got {args.lam}")
    if signals.get(options.get("signal") or "1-conf").needs_calibration:
      options["class_block"] = args.block  # its inner folds keep related rows together
    model, binning = fit(traces, **options)
    policy = solve(model, np.array([args.lam]), recall=recall)
    export_policy(args.out, policy, binning, model, 0, traces=traces)
    header = add_reference(args.out, traces)
    print(report.format_export(header, args.out))
    return 0
  low = 0 if args.metric == "agreement" else -1
  if not (np.isfinite(args.max_loss) and low <= args.max_loss <= 1):
    raise ValueError(f"--max-loss: expected an {args.metric}-loss budget in [{low}, 1], "
                     f"got {args.max_loss}")
  solver = "recall" if recall else "norecall"
  # best: every deployable method (`jexit budget`'s pool), less recall with --no-recall.
  ship = ((solver,) + tuple(m for m in DEPLOYABLE if m != solver and (recall or m != "recall"))
          if args.method in ("best", None) else (solver,))
  choice = choose(traces, args.max_loss, metric=args.metric, methods=ship, ship=ship,
                  signal=signal, seed=args.seed, block=args.block, num_lambdas=args.grid,
                  fit_options=options, delta=delta, calibration_share=args.calibration_share)
  if choice.table is None:
    fit_ev = choice.frontier.splits[0][ship[0]][0]
    ref = choice.frontier.backbone_fit_accuracy[0] if args.metric == "accuracy" else 1.0
    raise ValueError(f"--max-loss: no policy reaches {args.metric} >= "
                     f"{ref - args.max_loss:.4g} on the fit rows; the best is "
                     f"{float(np.max(getattr(fit_ev, args.metric))):.4g}")
  table = choice.table
  header = export_policy(args.out, table.policy, table.binning, table.model, table.lam_index,
                         traces=traces, budget={"max_loss": float(args.max_loss),
                                                "metric": args.metric},
                         certificate=report.certificate_to_dict(
                             choice.certificate, method=choice.best or ship[0],
                             metric=args.metric))
  header = add_reference(args.out, traces)  # TRACE's counts: what monitoring compares with
  print(report.format_export(header, args.out, choice))
  if note:
    print(note)
  return 0
