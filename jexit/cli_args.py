"""Argument types and helpers that several `jexit` subcommands share (cli.py and
the cli_*.py modules import them from here; nothing here imports a subcommand)."""

import argparse
import json

# `budget` and `export --max-loss` certify at this failure probability unless
# told `--delta none`: experiments/reports/CERTIFIED.md measured the
# uncertified choice above its budget on new rows in about half of all
# splits, and certified choices at most delta (docs/certify.md).
DEFAULT_DELTA = 0.1
NOT_CERTIFIED = ("not certified ({why}): the budget holds on the fit rows only; on new "
                 "inputs such a choice exceeded it in about half of all splits "
                 "(experiments/reports/CERTIFIED.md, docs/certify.md)")


def signal_range_arg(text):
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected LO,HI like 0,1, got {text!r}") from None
  return lo, hi


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


def _write_json(path, data) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, allow_nan=False)
    f.write("\n")
