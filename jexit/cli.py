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
import os
import re
import sys
import tempfile
import time
from typing import Optional

from jexit import cli_export, cli_monitor, cli_place, cli_record
from jexit.cli_args import (DEFAULT_DELTA, NOT_CERTIFIED, _add_certify_args,  # noqa: F401
                            _resolve_delta, _write_json, delta_arg, signal_range_arg)
from jexit.checks import PLOT_EXTENSIONS, check_output_path
from jexit.signals import NAMES as SIGNALS

# What the fit options on the command line map to (None = DEFAULT_FIT's value).
_FIT_ARGS = ("bins", "step", "num_bins", "loss", "target", "smoothing", "loss_smoothing",
             "signal_range")
# Rows of the embedded demo trace come in blocks of 4 augmented copies of one
# image (experiments/reports/TRACES.md): splits keep a block on one side.
DEMO_BLOCK = 4
DEMO_MAX_LOSS = 0.01  # the budget the demo's exit signal is chosen for


def _num_bins(text: str):
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int or a comma list like 16,32,64, "
                                     f"got {text!r}") from None
  return values[0] if len(values) == 1 else values


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


def _fit_overrides(args) -> dict:
  from jexit.protocol import PAPER_FIT  # pylint: disable=import-outside-toplevel
  base = dict(PAPER_FIT) if getattr(args, "paper", False) else {}
  base.update({k: getattr(args, k) for k in _FIT_ARGS if getattr(args, k, None) is not None})
  return base


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

  cli_record.add_parsers(sub)  # import-apparate, record
  cli_export.add_parser(sub)
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
  if args.func is not cli_record.run_import_apparate:
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
