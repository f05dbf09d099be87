"""`jexit place`: which candidate ramps to deploy per loss budget (docs/place.md).

  jexit place TRACE --max-loss 0.005,0.01 [--max-ramps M] [--must-include 0,3]
                    [--head-cost H] [--block B] [--delta D] [--json OUT]
                    [--plot OUT.png] [--out POLICY.npz]

Also `jexit export TRACE --max-loss 0.01 --place [--max-ramps M] --out POLICY.npz`
(`run_export_place`). Errors are ValueErrors; `jexit.cli.main` prints them as one
`jexit: error: ...` line and exits with 2.
"""

import argparse
import json
import os

import numpy as np

from jexit.cli_args import delta_arg


def _ramps_arg(text):
  try:
    return tuple(int(v) for v in text.split(",") if v.strip() != "")
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected 0-based candidate ramps like 0,3, got "
                                     f"{text!r}") from None


def _budgets_arg(text):
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected budgets like 0.005,0.01, got {text!r}") from None


def _head_cost_arg(text):
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or one per ramp (comma list), got "
                                     f"{text!r}") from None
  return values[0] if len(values) == 1 else values


def _delta_arg(text):
  return delta_arg(text)


def add_placement_args(p, *, budgets: bool = True) -> None:
  """The options `place` and `export --place` share."""
  g = p.add_argument_group("ramp placement (docs/place.md)")
  g.add_argument("--max-ramps", type=int, default=None, dest="max_ramps", metavar="M",
                 help="deploy at most M ramps, the last included (default: no limit)")
  g.add_argument("--must-include", type=_ramps_arg, default=(), dest="must_include",
                 metavar="R,R", help="0-based candidate ramps every subset keeps")
  g.add_argument("--head-cost", type=_head_cost_arg, default=None, dest="head_cost",
                 metavar="H", help="the heads' part of each ramp's cost (a number, or one "
                                   "per ramp), for a trace without head_cost")
  g.add_argument("--num-lambdas", type=int, default=None, dest="num_lambdas",
                 help="lam values per subset (default 200)")
  g.add_argument("--num-bins", type=int, default=None, dest="num_bins",
                 help="quantile bins per ramp (default 16)")


def add_parser(sub) -> argparse.ArgumentParser:
  """Adds `jexit place` to the subcommands `sub`."""
  p = sub.add_parser(
      "place", help="which candidate ramps to deploy, per loss budget",
      description="Enumerates the subsets of the trace's candidate ramps (the last ramp "
                  "always kept; one head per position), builds each subset's exit model "
                  "from per-ramp pieces fitted on a seeded fit split, solves every subset x "
                  "lam in batched calls (one per subset size), and per budget chooses the subset and lam with "
                  "the most fit speedup within the budget; prints the held-out results "
                  "against all candidate ramps, evenly spaced subsets and Apparate-style "
                  "greedy placement. Needs the trace's head_cost (or --head-cost).")
  p.add_argument("trace", help="candidate trace .npz (conf, pred, cost, head_cost[, label, "
                               "position])")
  p.add_argument("--max-loss", type=_budgets_arg, required=True, dest="max_loss",
                 help="agreement-loss budget(s), a comma list like 0.005,0.01")
  add_placement_args(p)
  p.add_argument("--block", type=int, default=1,
                 help="split rows in blocks of this many related rows (default 1)")
  p.add_argument("--seed", type=int, default=0, help="seed of the fit split (default 0)")
  p.add_argument("--delta", type=_delta_arg, default=None, metavar="D",
                 help="certify each budget's chosen subset at failure probability D on the "
                      "held-out rows (default: none, the budget holds on the fit rows only)")
  p.add_argument("--json", help="write the choices, comparisons and frontier as JSON here")
  p.add_argument("--plot", help="write the held-out frontier across subsets as a PNG here")
  p.add_argument("--out", help="write the chosen subset's policy table here (one budget)")
  p.set_defaults(func=run_place)
  return p


def _check(args):
  if args.max_ramps is not None and args.max_ramps < 1:
    raise ValueError(f"--max-ramps: expected an integer >= 1, got {args.max_ramps}")
  if args.num_lambdas is not None and args.num_lambdas < 1:
    raise ValueError(f"--num-lambdas: expected an integer >= 1, got {args.num_lambdas}")
  if args.num_bins is not None and args.num_bins < 1:
    raise ValueError(f"--num-bins: expected an integer >= 1, got {args.num_bins}")


def _place(args, traces, budgets, delta):
  from jexit.place import place  # pylint: disable=import-outside-toplevel
  from jexit.subsets import NUM_BINS, NUM_LAMBDAS  # pylint: disable=import-outside-toplevel
  k = traces.num_ramps
  bad = [r for r in args.must_include if not 0 <= r < k]
  if bad:
    raise ValueError(f"--must-include: expected 0-based candidate ramps in [0, {k}), got "
                     f"{list(args.must_include)}")
  try:
    return place(traces, list(budgets), max_ramps=args.max_ramps,
                 must_include=args.must_include, head_cost=args.head_cost,
                 block=args.block, seed=args.seed, delta=delta,
                 num_lambdas=args.num_lambdas or NUM_LAMBDAS,
                 num_bins=args.num_bins or NUM_BINS)
  except ValueError as e:
    # Name the flags, not the Python arguments.
    text = str(e)
    for name, flag in (("traces.head_cost:", "traces.head_cost (or --head-cost):"),
                       ("head_cost:", "--head-cost:"), ("max_ramps:", "--max-ramps:"),
                       ("must_include:", "--must-include:"), ("max_loss:", "--max-loss:")):
      if text.startswith(name):
        text = flag + text[len(name):]
        break
    raise ValueError(text) from None


def run_place(args) -> int:
  from jexit import plots, report  # pylint: disable=import-outside-toplevel
  from jexit.export import export_placement  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel
  _check(args)
  if args.out and len(args.max_loss) != 1:
    raise ValueError(f"--out: writes one table; expected one --max-loss value, got "
                     f"{list(args.max_loss)}")
  for b in args.max_loss:
    if not (np.isfinite(b) and 0 <= b <= 1):
      raise ValueError(f"--max-loss: expected agreement-loss budgets in [0, 1], got {b}")
  delta = None if args.delta in (None, "none") else args.delta
  traces = load_traces(args.trace)
  res = _place(args, traces, args.max_loss, delta)
  print(report.format_placement(res, trace=args.trace))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report.placement_to_dict(res, args.trace), f, indent=1, allow_nan=False)
      f.write("\n")
    print(f"wrote {args.json}")
  if args.plot:
    print(f"wrote {plots.plot_placement(res, args.plot, os.path.basename(args.trace))}")
  if args.out:
    header = export_placement(args.out, res, res.budgets[0], traces)
    print(f"wrote {args.out}: active ramps {header['active_ramps']}, lam {header['lam']:.4g}")
  return 0


def run_export_place(args, traces, delta) -> int:
  """`jexit export --place`: the chosen subset's table for `--max-loss`, with
  the trace's reference counts on its active ramps (as `jexit export`)."""
  from jexit.export import export_placement  # pylint: disable=import-outside-toplevel
  _check(args)
  if args.max_loss is None:
    raise ValueError("--place chooses on a fit split; it needs --max-loss")
  if not (np.isfinite(args.max_loss) and 0 <= args.max_loss <= 1):
    raise ValueError(f"--max-loss: expected an agreement-loss budget in [0, 1], got "
                     f"{args.max_loss}")
  res = _place(args, traces, [args.max_loss], delta)
  header = export_placement(args.out, res, res.budgets[0], traces)
  b = res.budgets[0].placed
  print(f"wrote {args.out}: active ramps {header['active_ramps']} of {traces.num_ramps} "
        f"candidates, lam {header['lam']:.4g}; held out: speedup {b['test']['speedup']:.3f}x, "
        f"agreement loss {1 - b['test']['agreement']:.4f}")
  return 0
