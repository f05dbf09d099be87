"""The `jexit` command line: the only place in jexit that touches argv, files and stdout.

  jexit sweep TRACE [--json OUT] [--plot OUT.png]   every method's frontier
  jexit budget TRACE --max-loss 0.01 [--metric M]   parameters for a budget, certified
                                                    at --delta 0.1 unless --delta none
  jexit demo [--out DIR]                            the sweep on the embedded trace
  jexit export TRACE (--lam X | --max-loss Y) --out POLICY.npz
  jexit import-apparate PICKLE --out TRACE.npz --allow-pickle
  jexit place TRACE --max-loss 0.005,0.01 [--max-ramps M]   which ramps to deploy

Errors from bad input print one line, `jexit: error: ...`, and exit with 2.
"""

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from jexit import cli_monitor
from jexit.checks import PLOT_EXTENSIONS, check_output_path
from jexit import cli_place
from jexit.signals import NAMES as SIGNALS

# What the fit options on the command line map to (None = DEFAULT_FIT's value).
_FIT_ARGS = ("bins", "step", "num_bins", "loss", "target", "smoothing", "loss_smoothing",
             "signal_range")
# Rows of the embedded demo trace come in blocks of 4 augmented copies of one
# image (experiments/reports/TRACES.md): splits keep a block on one side.
DEMO_BLOCK = 4
DEMO_MAX_LOSS = 0.01  # the budget the demo's exit signal is chosen for
# `budget` and `export --max-loss` certify at this failure probability unless
# told `--delta none`: experiments/reports/CERTIFIED.md measured the
# uncertified choice above its budget on new rows in about half of all
# splits, and certified choices at most delta (docs/certify.md).
DEFAULT_DELTA = 0.1
NOT_CERTIFIED = ("not certified ({why}): the budget holds on the fit rows only; on new "
                 "inputs such a choice exceeded it in about half of all splits "
                 "(experiments/reports/CERTIFIED.md, docs/certify.md)")


def _num_bins(text: str):
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int or a comma list like 16,32,64, "
                                     f"got {text!r}") from None
  return values[0] if len(values) == 1 else values


def signal_range_arg(text):
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected LO,HI like 0,1, got {text!r}") from None
  return lo, hi


def _add_fit_args(p, auto_signal=False):
  g = p.add_argument_group("model (defaults: jexit.protocol.DEFAULT_FIT)")
  if auto_signal:
    g.add_argument("--signal", choices=("auto",) + SIGNALS,
                   default="auto",
                   help="exit signal of the solver's model; auto (default) picks 1-conf "
                        "(or the trace's signal), stability or class by inner "
                        "cross-fitting on the fit rows (one split; with --folds it keeps "
                        "1-conf)")
  else:
    g.add_argument("--signal", choices=SIGNALS,
                   help="exit signal: 1 - conf (default; the trace's signal if it has "
                        "one), stability (1 - conf, plus 1 where the prediction changed "
                        "since the previous ramp), class (1 - a per-class logistic "
                        "estimate, fitted on the fit rows, that the ramp agrees with the "
                        "final one) or the trace's signal")
  g.add_argument("--signal-range", type=signal_range_arg, dest="signal_range",
                 help="LO,HI: the whole range of the trace's own signal, the outer bin "
                      "edges (default: the fit rows' range; give e.g. 0,1 for a margin so "
                      "the runtime serves held-out values beyond it)")
  g.add_argument("--bins", choices=("uniform", "quantile"),
                 help="bins of the exit signal: uniform width --step or per-ramp quantiles")
  g.add_argument("--step", type=float, help="bin width for --bins uniform (paper: 0.08)")
  g.add_argument("--paper", action="store_true",
                 help="the paper's model: uniform 0.08 bins, loss = 1 - conf (proxy)")
  g.add_argument("--num-bins", type=_num_bins, dest="num_bins",
                 help="S for --bins quantile; a comma list (16,32,64) pools candidates")
  g.add_argument("--loss", choices=("proxy", "calibrated", "logistic"),
                 help="loss table: proxy (1 - conf, the paper's), per-bin calibrated "
                      "error rates, or a logistic calibration of them")
  g.add_argument("--target", choices=("agreement", "label"),
                 help="what --loss calibrated calibrates against")
  g.add_argument("--smoothing", type=float, help="additive count on transitions")
  g.add_argument("--loss-smoothing", type=float, dest="loss_smoothing",
                 help="pseudo-count of calibrated losses")


def _add_split_args(p):
  g = p.add_argument_group("fit/test split")
  g.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
  g.add_argument("--test-fraction", type=float, default=None, dest="test_fraction",
                 help="share of rows held out (default 0.5; a certified budget holds out "
                      "--calibration-share instead)")
  g.add_argument("--folds", type=int, default=None,
                 help="k-fold cross-fitting instead of one split")
  g.add_argument("--block", type=int, default=1,
                 help="split rows in blocks of this many consecutive rows (related "
                      "inputs stay on one side; default 1)")
  g.add_argument("--num-lambdas", type=int, default=1000, dest="num_lambdas",
                 help="lam values solved (default 1000)")


def delta_arg(text):
  """`--delta`: a failure probability in (0, 1), or "none" (no certification)."""
  if text.strip().lower() == "none":
    return "none"
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a failure probability in (0, 1) or none, "
                                     f"got {text!r}") from None
  if not 0 < value < 1:
    raise argparse.ArgumentTypeError(f"expected a failure probability in (0, 1) or none, "
                                     f"got {text!r}")
  return value


def _add_certify_args(p, default_help):
  g = p.add_argument_group("certified budget (docs/certify.md)")
  g.add_argument("--delta", type=delta_arg, default=None, metavar="D",
                 help="certify the budget: hold out calibration rows that no fit or choice "
                      "sees, and ship a table whose true loss exceeds --max-loss with "
                      f"probability at most D; 'none': do not certify. {default_help}")
  g.add_argument("--calibration-share", type=float, default=None, dest="calibration_share",
                 metavar="S",
                 help="share of the rows (blocks) held out for calibration (default: 0.5, "
                      "or 0.7 when 0.5 leaves fewer than twice the units the budget needs)")


def _resolve_delta(args, max_loss, *, folds=None, lam=None):
  """`(delta or None, a note to print or None)` from --delta and the other flags."""
  asked = args.delta
  share = getattr(args, "calibration_share", None)
  if asked is None:  # the default
    if lam is not None:
      delta, why = None, None
    elif folds is not None:
      delta, why = None, "--folds: cross-fitting ships no table"
    elif max_loss is not None and not max_loss > 0:
      delta, why = None, "a zero budget or a required gain cannot be certified"
    else:
      delta, why = DEFAULT_DELTA, None
  elif asked == "none":
    delta, why = None, "--delta none"
  else:
    if lam is not None:
      raise ValueError("--delta: a certified budget is chosen on a fit/calibration split; it "
                       "needs --max-loss, not --lam")
    if folds is not None:
      raise ValueError(f"--delta: a certified budget needs one fit/calibration split and "
                       f"ships one table; expected no --folds, got --folds {folds}")
    delta, why = asked, None
  if share is not None and delta is None:
    raise ValueError(f"--calibration-share: only for a certified budget (--delta D), got "
                     f"{share} with {'--lam' if lam is not None else why}")
  if delta is not None and getattr(args, "test_fraction", None) is not None:
    raise ValueError(f"--test-fraction: with a certified budget (--delta {delta:g}, the "
                     f"default) the held-out rows are the calibration rows; set their share "
                     f"with --calibration-share, or pass --delta none")
  return delta, (None if why is None or lam is not None else NOT_CERTIFIED.format(why=why))


def _fit_overrides(args) -> dict:
  from jexit.protocol import PAPER_FIT  # pylint: disable=import-outside-toplevel
  base = dict(PAPER_FIT) if getattr(args, "paper", False) else {}
  base.update({k: getattr(args, k) for k in _FIT_ARGS if getattr(args, k, None) is not None})
  return base


def _write_json(path, data) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, allow_nan=False)
    f.write("\n")


def _check_outputs(args) -> None:
  """Checks --json and --plot before the work that writes them."""
  if getattr(args, "json", None) is not None:
    check_output_path("--json", args.json)
  if getattr(args, "plot", None) is not None:
    check_output_path("--plot", args.plot, extensions=PLOT_EXTENSIONS)
    if importlib.util.find_spec("matplotlib") is None:
      raise ValueError("--plot: needs matplotlib, which is not installed; "
                       "pip install 'jexit[plot]'")


def _frontier_kwargs(args) -> dict:
  fit_options = _fit_overrides(args)
  if getattr(args, "signal", None) is not None:
    fit_options["signal"] = args.signal
  test_fraction = 0.5 if args.test_fraction is None else args.test_fraction
  return dict(num_lambdas=args.num_lambdas, test_fraction=test_fraction,
              seed=args.seed, folds=args.folds, block=args.block, fit_options=fit_options)


def _plot(fr, path, trace, max_loss) -> str:
  from jexit.plots import plot_sweep  # pylint: disable=import-outside-toplevel
  return plot_sweep(fr, path, max_loss=max_loss, trace=trace)


def _sweep(fr, trace_name, args) -> None:
  from jexit import report  # pylint: disable=import-outside-toplevel
  print(report.format_frontier(fr, trace=trace_name))
  if args.json:
    _write_json(args.json, report.frontier_to_dict(fr, trace_name, all_points=args.all_points))
    print(f"wrote {args.json}")
  if args.plot:
    print(f"wrote {_plot(fr, args.plot, os.path.basename(trace_name), args.max_loss)}")


def run_sweep(args) -> int:
  from jexit.protocol import frontier  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel
  if not 0 <= args.max_loss <= 1:  # NaN fails too
    raise ValueError(f"--max-loss: expected an agreement-loss budget in [0, 1], "
                     f"got {args.max_loss}")
  _check_outputs(args)
  traces = load_traces(args.trace)
  fr = frontier(traces, **_frontier_kwargs(args))
  _sweep(fr, args.trace, args)
  return 0


def run_budget(args) -> int:
  from jexit import report  # pylint: disable=import-outside-toplevel
  from jexit.select import choose  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel
  delta, note = _resolve_delta(args, args.max_loss, folds=args.folds)
  _check_outputs(args)
  traces = load_traces(args.trace)
  kwargs = _frontier_kwargs(args)
  signal = kwargs["fit_options"].pop("signal")  # auto selects with one split only
  if delta is not None:
    kwargs.update(test_fraction=None, delta=delta, calibration_share=args.calibration_share)
  choice = choose(traces, args.max_loss, signal=signal, metric=args.metric, **kwargs)
  print(report.format_choice(choice, trace=args.trace))
  if note:
    print(note)
  if args.json:
    _write_json(args.json, report.choice_to_dict(choice, args.trace))
    print(f"wrote {args.json}")
  return 0


def run_demo(args) -> int:
  from jexit import datasets, report  # pylint: disable=import-outside-toplevel
  from jexit.protocol import APPARATE_BUDGETS  # pylint: disable=import-outside-toplevel
  from jexit.select import choose  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel
  path = datasets.demo_trace_path()
  if not os.path.exists(path):
    raise ValueError(f"the embedded demo trace is missing ({path}); reinstall jexit")
  if args.out is not None:
    check_output_path("--out", args.out, folder=True)
  start = time.perf_counter()
  traces = load_traces(path)
  # As `jexit budget`: the exit signal is chosen on the fit rows (at 1% loss)
  # first; the table then shows every budget on the same frontier.
  # Certified on the held-out half itself (calibration share 0.5): the table
  # below is the same split's, and one line certifies its 1% choice.
  choice = choose(traces, DEMO_MAX_LOSS, seed=0, block=DEMO_BLOCK, num_lambdas=1000,
                  apparate_budgets=APPARATE_BUDGETS, delta=DEFAULT_DELTA,
                  calibration_share=0.5)
  fr, scores = choice.frontier, choice.signal_scores
  signal = choice.fit_options.get("signal")
  out = args.out or tempfile.mkdtemp(prefix="jexit-demo-")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out: expected a folder for the demo's outputs, got the file {out}")
  os.makedirs(out, exist_ok=True)
  name = f"{os.path.basename(path)} (embedded: {traces.num_inputs} inputs, "\
         f"{traces.num_ramps} ramps)"
  print("jexit demo: fit on half the rows, solve 1,000 lam values, evaluate every "
        "method on the held-out half")
  if scores:
    print(f"exit signal of recall/norecall: {signal} (chosen on the fit rows by inner "
          f"cross-fitting at {DEMO_MAX_LOSS:.0%} loss, as `jexit budget`; mean held-out speedup: "
          + ", ".join(f"{sig} {v:.2f}x" for sig, v in scores.items()) + ")")
  args.json = os.path.join(out, "frontier.json")
  args.all_points = False
  has_plots = importlib.util.find_spec("matplotlib") is not None  # the optional extra
  args.plot = os.path.join(out, "frontier.png") if has_plots else None
  args.max_loss = DEMO_MAX_LOSS
  _sweep(fr, name, args)
  print(f"certified at {DEMO_MAX_LOSS:.0%}, delta {DEFAULT_DELTA:g} (as `jexit budget` by "
        f"default; the held-out half is the calibration rows): "
        + report.format_certificate(choice).replace("certificate: ", "", 1))
  if args.plot is None:
    print("(no plot: matplotlib is not installed; pip install 'jexit[plot]')")
  print(f"done in {time.perf_counter() - start:.1f} s; outputs in {out}")
  return 0


def _add_export_parser(subparsers) -> argparse.ArgumentParser:
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


def run_import_apparate(args) -> int:
  from jexit.importers import load_apparate  # pylint: disable=import-outside-toplevel
  from jexit.traces import save_traces  # pylint: disable=import-outside-toplevel
  check_output_path("--out", args.out)
  cost = None
  if args.cost:
    try:
      cost = [float(v) for v in args.cost.split(",")]
    except ValueError as e:
      raise ValueError(f"--cost: expected comma-separated numbers, got {args.cost!r}") from e
  traces = load_apparate(args.pickle, allow_pickle=args.allow_pickle, cost=cost)
  save_traces(args.out, traces)
  print(f"wrote {args.out}: {traces.num_inputs} inputs, {traces.num_ramps} ramps, "
        f"cost {traces.cost.tolist()}" + ("" if cost else " (default: 1 per segment)"))
  return 0


def _add_record_parser(sub):
  """Adds `jexit record --arch vgg11|vgg13|vgg16 ... --out TRACE.npz` (torch extra)."""
  p = sub.add_parser(
      "record", help="train and record an early-exit VGG's trace (needs jexit[torch])",
      description="Builds an early-exit VGG-11/13/16 (torchvision's layer configurations), "
                  "loads local weights if given, trains what needs training on the training "
                  "images, runs every ramp over held-out images and writes the trace: conf, "
                  "pred, label, cost and head_cost (FLOPs or measured ms) per ramp. Never "
                  "downloads anything. For any other torch model: jexit.record.record "
                  "(docs/record.md).")
  p.add_argument("--arch", required=True, choices=("vgg11", "vgg13", "vgg16"))
  p.add_argument("--ramps", default="3",
                 help="3 or 5 (the default placements: after pooling stages 2,3,5 or 1..5), "
                      "or comma-separated pooling stages in 1..5 ending with 5, e.g. 2,4,5")
  p.add_argument("--weights", help="local state dict: one --save-weights wrote, or "
                                   "torchvision's vgg*/vgg*_bn ImageNet file (backbone only; "
                                   "needs --width-div 1)")
  data = p.add_mutually_exclusive_group()
  data.add_argument("--digits", action="store_true",
                    help="scikit-learn's embedded 8x8 digits, resized (the default)")
  data.add_argument("--images", metavar="DIR",
                    help="a local ImageFolder: one sub-folder of images per class")
  p.add_argument("--size", type=int, default=None,
                 help="image side in pixels (>= 32): digits are resized to it (default 32); "
                      "--images are resized and centre-cropped to it (default: kept as they "
                      "are, and must then all have one size)")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs of the backbone and final head (default 10, or 0 with --weights)")
  p.add_argument("--train-ramps", type=int, default=None, dest="train_ramps", metavar="EPOCHS",
                 help="epochs of the ramp heads on the frozen backbone (default --epochs); a "
                      "torchvision --weights file sets no head, so its final head trains "
                      "with them")
  p.add_argument("--joint", action="store_true",
                 help="train the backbone and every head together for --epochs instead")
  p.add_argument("--width-div", type=int, default=1, dest="width_div",
                 help="divide every channel count by this (default 1: torchvision's widths)")
  p.add_argument("--head-pool", type=int, default=4, dest="head_pool",
                 help="the ramp heads average-pool to this n x n before their linear layer")
  p.add_argument("--no-batch-norm", action="store_true", dest="no_batch_norm",
                 help="conv-ReLU blocks without batch norm (torchvision's vgg11, not vgg11_bn)")
  p.add_argument("--cost", choices=("flops", "latency"), default="flops",
                 help="cost per ramp: FLOPs (default) or median ms per input measured on "
                      "--device at --latency-batch-size")
  p.add_argument("--latency-batch-size", type=int, default=1, dest="latency_batch_size")
  p.add_argument("--batch-size", type=int, default=256, dest="batch_size",
                 help="inputs per recording pass (default 256)")
  p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
  p.add_argument("--signal", choices=("margin", "entropy"), default=None,
                 help="also record each ramp's margin (1 - top1 + top2) or normalised entropy "
                      "as the trace's signal")
  p.add_argument("--trace-frac", type=float, default=0.4, dest="trace_frac",
                 help="share of the images held out for the trace (default 0.4)")
  p.add_argument("--copies", type=int, default=None,
                 help="trace rows per held-out image, as seeded augmentations (digits: 4; "
                      "--images: 1, the image itself)")
  p.add_argument("--max-images", type=int, default=None, dest="max_images",
                 help="use a seeded subset of this many images")
  p.add_argument("--seed", type=int, default=0, help="seed of the split, model and training")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  p.add_argument("--save-weights", default=None, dest="save_weights",
                 help="write the trained model's state dict here (serve it: docs/serve.md)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--out", required=True, help="trace .npz to write")
  p.set_defaults(func=run_record)


def run_record(args) -> int:
  check_output_path("--out", args.out)  # before torch's import and the training
  if args.save_weights is not None:
    check_output_path("--save-weights", args.save_weights)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from jexit import vgg, vgg_traces  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"jexit record needs torch, torchvision, scikit-learn and tqdm: "
                      f"pip install 'jexit[torch]' ({e})") from e
  from jexit.record import resolve_device  # pylint: disable=import-outside-toplevel
  from jexit.traces import save_traces  # pylint: disable=import-outside-toplevel
  try:
    stages = tuple(int(v) for v in args.ramps.split(","))
  except ValueError:
    raise ValueError(f"--ramps: expected 3, 5 or comma-separated pooling stages like 2,3,5, "
                     f"got {args.ramps!r}") from None
  if len(stages) == 1 and stages[0] in vgg.DEFAULT_RAMP_STAGES:
    stages = vgg.DEFAULT_RAMP_STAGES[stages[0]]
  if (len(stages) < 2 or list(stages) != sorted(set(stages)) or stages[0] < 1
      or stages[-1] != vgg.NUM_STAGES):
    raise ValueError(f"--ramps: expected 3, 5 or increasing pooling stages in 1..5 ending "
                     f"with 5 (at least two ramps), got {args.ramps!r}")
  for flag, value, low in (("--size", args.size, vgg.MIN_SIZE), ("--epochs", args.epochs, 0),
                           ("--train-ramps", args.train_ramps, 0), ("--width-div", args.width_div, 1),
                           ("--head-pool", args.head_pool, 1), ("--batch-size", args.batch_size, 1),
                           ("--latency-batch-size", args.latency_batch_size, 1),
                           ("--copies", args.copies, 1), ("--max-images", args.max_images, 2),
                           ("--threads", args.threads, 1), ("--seed", args.seed, 0)):
    if value is not None and value < low:
      raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
  if not 0 < args.trace_frac < 1:
    raise ValueError(f"--trace-frac: expected a share in (0, 1), got {args.trace_frac}")
  if args.weights is not None and not os.path.isfile(args.weights):
    raise ValueError(f"--weights: no such file {args.weights!r}")
  if args.joint and args.train_ramps is not None:
    raise ValueError("--train-ramps: joint training (--joint) trains every head with the "
                     "backbone for --epochs; expected no --train-ramps")
  device = resolve_device(args.device, field="--device")
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.images is not None:
    data = vgg_traces.load_image_folder(args.images, size=args.size)
  else:
    data = vgg_traces.load_digits_images(args.size or 32)
  epochs = args.epochs if args.epochs is not None else (0 if args.weights else 10)
  copies = args.copies or (1 if args.images is not None else 4)
  config = vgg_traces.TraceConfig(
      arch=args.arch, ramp_stages=stages, width_div=args.width_div,
      batch_norm=not args.no_batch_norm, head_pool=args.head_pool, epochs=epochs,
      ramp_epochs=args.train_ramps, training="joint" if args.joint else "separate",
      trace_frac=args.trace_frac, copies=copies,
      augment_trace=args.images is None or copies > 1, max_images=args.max_images,
      seed=args.seed, cost=args.cost, size=int(data.images.shape[-1]), signal=args.signal,
      record_batch_size=args.batch_size, latency_batch_size=args.latency_batch_size)
  run = vgg_traces.make_traces(config, data=data, weights=args.weights, device=device,
                        progress=not args.quiet)
  save_traces(args.out, run.traces)
  t = run.traces
  unit = "FLOPs" if args.cost == "flops" else "ms"
  print(f"wrote {args.out}: {t.num_inputs} inputs ({data.name}, {copies} per held-out image), "
        f"{t.num_ramps} ramps of {args.arch} after pooling stages {list(stages)}, trained "
        f"in {run.train_seconds:.0f} s on {device}")
  print("  accuracy  " + " ".join(f"{a:.4f}" for a in run.accuracy))
  print("  agreement " + " ".join(f"{a:.4f}" for a in run.agreement))
  print(f"  cost ({unit}) " + " ".join(f"{c:.4g}" for c in t.cost)
        + "  (heads: " + " ".join(f"{c:.4g}" for c in t.head_cost) + ")")
  if args.save_weights:
    torch.save(run.model.state_dict(), args.save_weights)
    print(f"wrote {args.save_weights} (state dict of jexit.vgg.EarlyExitVGG({args.arch!r}, "
          f"{stages}, num_classes={data.num_classes}, width_div={args.width_div}, "
          f"batch_norm={not args.no_batch_norm}, head_pool={args.head_pool}))")
  block = f" --block {copies}" if copies > 1 else ""
  print(f"next: jexit budget {args.out} --max-loss 0.01{block}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The `jexit` argument parser with every subcommand."""
  parser = argparse.ArgumentParser(
      prog="jexit", description="Optimal exit policies (with recall) for early-exit networks.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  p = sub.add_parser("sweep", help="frontier of every method on a trace",
                     description="Fits on a seeded fit split, solves a lam grid, evaluates "
                                 "every method on held-out rows and prints, per "
                                 "agreement-loss budget, the test speedup of the parameter "
                                 "chosen on the fit rows.")
  p.add_argument("trace", help="trace .npz (conf, pred, cost[, label, signal])")
  p.add_argument("--json", help="write the frontier (Pareto points) as JSON here")
  p.add_argument("--all-points", action="store_true", dest="all_points",
                 help="JSON: every parameter, not only the Pareto points")
  p.add_argument("--plot", help="write the frontier, if-stop tables and histograms here (.png)")
  p.add_argument("--max-loss", type=float, default=0.01, dest="max_loss",
                 help="budget whose chosen policy the plot's tables show (default 0.01)")
  _add_split_args(p)
  _add_fit_args(p)
  p.set_defaults(func=run_sweep)

  p = sub.add_parser("budget", help="each method's parameter for an agreement- or "
                                    "accuracy-loss budget",
                     description="Per method, the parameter with the most speedup whose "
                                 "agreement (or accuracy) loss on the fit rows is at most "
                                 "--max-loss, with its fit and test metrics.")
  p.add_argument("trace", help="trace .npz")
  p.add_argument("--max-loss", type=float, default=0.01, dest="max_loss",
                 help="loss budget (default 0.01: 99%% agreement, or with --metric accuracy "
                      "1 point below the backbone's accuracy; negative: a required gain)")
  p.add_argument("--metric", choices=("agreement", "accuracy"), default="agreement",
                 help="what the budget limits: agreement with the final ramp (default) or "
                      "accuracy against the labels, relative to the backbone; accuracy fits "
                      "the solver's loss to the labels (--target label) unless --target is given")
  p.add_argument("--json", help="write the choices as JSON here")
  _add_split_args(p)
  _add_certify_args(p, f"Default: {DEFAULT_DELTA:g} (none with --folds, or a budget <= 0).")
  _add_fit_args(p, auto_signal=True)
  p.set_defaults(func=run_budget)

  p = sub.add_parser("demo", help="the sweep on the embedded digits VGG-11 trace",
                     description="Fits on half of the embedded trace, solves 1,000 lam "
                                 "values, evaluates them and the baselines on the other "
                                 "half, prints the table and writes the plot.")
  p.add_argument("--out", help="folder for frontier.png and frontier.json "
                               "(default: a new temporary folder)")
  p.set_defaults(func=run_demo)

  p = sub.add_parser("import-apparate", help="convert an Apparate pickle to a trace .npz",
                     description="Reads an Apparate profile pickle ({'conf', 'acc'} per "
                                 "ramp) with a restricted unpickler and writes a trace.")
  p.add_argument("pickle", help="Apparate profile pickle")
  p.add_argument("--out", required=True, help="trace .npz to write")
  p.add_argument("--allow-pickle", action="store_true", dest="allow_pickle",
                 help="required: unpickling can run code; only for files you trust")
  p.add_argument("--cost", help="comma-separated segment costs (default 1 per segment)")
  p.set_defaults(func=run_import_apparate)
  _add_record_parser(sub)

  _add_export_parser(sub)
  cli_monitor.add_parsers(sub)  # monitor, refit
  cli_place.add_parser(sub)  # jexit place (docs/place.md)
  return parser


CACHE_ENV = "JEXIT_CACHE_DIR"


def compilation_cache_dir() -> str:
  """Where compiled XLA programs are kept between runs ("" = nowhere).

  `$JEXIT_CACHE_DIR` if set (empty disables the cache), else
  `$XDG_CACHE_HOME/jexit/xla` or `~/.cache/jexit/xla`.
  """
  if CACHE_ENV in os.environ:
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jexit", "xla")


def _enable_compilation_cache() -> None:
  # A fresh process otherwise spends most of a sweep compiling the solver and
  # the replay; JAX's persistent cache makes the second run of a command fast.
  path = compilation_cache_dir()
  if not path:
    return
  try:
    os.makedirs(path, exist_ok=True)
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  except (OSError, ImportError, AttributeError, ValueError):
    pass  # a read-only home or an older JAX: run without the cache


# API field names in errors that a subcommand spells as another option (dest), in
# order of preference: export's chooser takes its lam count from --grid (its
# --num-lambdas is placement's, which names its own flag).
_FIELD_DESTS = {"num_lambdas": ("grid", "num_lambdas"), "lambdas": ("grid", "num_lambdas"),
                "path": ("out",)}
_FIELD = re.compile(r"^([a-z][a-z0-9_]*)(?=[:=])")


def _name_flag(message: str, parser: Optional[argparse.ArgumentParser]) -> str:
  """`message` with a leading API field name (`num_bins: ...`, `step=inf: ...`)
  replaced by the flag of `parser` that sets it (`--num-bins: ...`)."""
  match = _FIELD.match(message)
  if parser is None or match is None:
    return message
  flags = {}
  for action in parser._actions:  # pylint: disable=protected-access
    longs = [o for o in action.option_strings if o.startswith("--")]
    if longs:
      flags[action.dest] = longs[0]
  field = match.group(1)
  for dest in _FIELD_DESTS.get(field, ()) + (field,):
    if dest in flags:
      return flags[dest] + message[match.end():]
  return message


def _subparser(parser, command) -> Optional[argparse.ArgumentParser]:
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return action.choices.get(command)
  return None


def main(argv=None) -> int:
  """Runs the command line; returns the exit status (2 for bad input)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if getattr(args, "func", None) is None:
    parser.print_help()
    return 2
  if args.func is not run_import_apparate:
    _enable_compilation_cache()
  try:
    return int(args.func(args) or 0)
  except (ValueError, OSError, ImportError, MemoryError) as e:
    message = " ".join(str(e).split())
    if isinstance(e, MemoryError):  # a guard missed it: still one line, not a traceback
      message = f"out of memory ({message or 'MemoryError'}); use smaller sizes"
    message = _name_flag(message, _subparser(parser, args.command))
    print(f"jexit: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
