"""Exports one solved exit policy as a versioned, self-describing `.npz`.

The file layout (format `jexit-policy`, version 1) and its reader live in
`jexit.runtime`, which needs only numpy; this module writes it and holds the
`jexit export` subcommand. `load_policy_file` is re-exported from there.
"""

import argparse
import hashlib
import json
import os
from typing import Optional

import numpy as np

from jexit import signals
from jexit.runtime import (FORMAT_NAME, FORMAT_VERSION, ExitTable, check_arrays,
                           check_calibration, check_header, load_policy_file)
from jexit.signals import class_weights_ok
from jexit.types import Binning, ExitModel, Policy, Traces, is_bool_like, is_int_scalar

__all__ = ["add_export_parser", "export_policy", "load_policy_file", "run_export",
           "trace_sha256"]


def trace_sha256(traces: Traces) -> str:
  """sha256 hex digest of a trace's arrays, stable under save/load.

  Hashes, for each present field of `Traces` (conf, pred, label, cost,
  signal, head_cost, position), its name, shape and bytes in the dtype the
  trace file stores (float32 conf and signal, int64 pred, label and position,
  float64 cost and head_cost), so a trace and the same trace written and
  re-read with `jexit.save_traces`/`load_traces` hash alike.
  """
  if not isinstance(traces, Traces):
    raise ValueError(f"traces: expected jexit.Traces, got {type(traces).__name__}")
  dtypes = {"conf": np.float32, "pred": np.int64, "label": np.int64,
            "cost": np.float64, "signal": np.float32, "head_cost": np.float64,
            "position": np.int64}
  h = hashlib.sha256()
  for name in Traces._fields:
    a = getattr(traces, name)
    if a is None:
      continue
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
      raise ValueError(f"traces.{name}: expected real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a.astype(dtypes[name]))
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _pick(name, a, index, axis_name):
  """`a[index]` with a ValueError naming the field when out of range."""
  size = a.shape[0]
  if not is_int_scalar(index):
    raise ValueError(f"{axis_name}: expected an int index, got {index!r}")
  if not -size <= index < size:
    raise ValueError(f"{axis_name}: expected an index in [0, {size}) into {name} "
                     f"(shape {a.shape}), got {index}")
  return a[index]


def policy_arrays(policy: Policy, binning: Binning, model: Optional[ExitModel],
                  lam_index: int, *, model_index: Optional[int] = None):
  """Selects one policy of a (batched) solve and checks it against its inputs.

  Args:
    policy: `Policy` with `threshold [L, K, S]` or `[M, L, K, S]`.
    binning: the `Binning` it was fitted with, `edges [K, S+1]` (or
      `[M, K, S+1]` per model).
    model: the `ExitModel` it was solved from (checked against `policy.loss`
      and `policy.cost`), or None.
    lam_index: which lam of the grid.
    model_index: which model of a batch; required iff the policy is batched.

  Returns:
    `(header fields dict, edges [K, S+1], loss [K, S], threshold [K, S], cost [K])`.
  """
  if not isinstance(policy, Policy):
    raise ValueError(f"policy: expected jexit.Policy, got {type(policy).__name__}")
  if not isinstance(binning, Binning):
    raise ValueError(f"binning: expected jexit.Binning, got {type(binning).__name__}")
  threshold = np.asarray(policy.threshold)
  lam = np.asarray(policy.lam)
  value = np.asarray(policy.value)
  loss = np.asarray(policy.loss)
  cost = np.asarray(policy.cost)
  edges = np.asarray(binning.edges)
  for name, a in (("policy.threshold", threshold), ("policy.lam", lam),
                  ("policy.value", value), ("policy.loss", loss), ("policy.cost", cost),
                  ("binning.edges", edges)):
    if a.dtype.kind not in "iuf":
      raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
  if not is_bool_like(policy.recall):
    raise ValueError(f"policy.recall: expected a bool, got {policy.recall!r}")
  edges = edges.astype(np.float64)
  if threshold.ndim == 4:
    if model_index is None:
      raise ValueError(f"model_index: the policy holds a batch of {threshold.shape[0]} "
                       f"models (threshold shape {threshold.shape}); say which one")
    threshold = _pick("policy.threshold", threshold, model_index, "model_index")
    lam = _pick("policy.lam", lam, model_index, "model_index")
    value = _pick("policy.value", value, model_index, "model_index")
    loss = _pick("policy.loss", loss, model_index, "model_index")
    cost = _pick("policy.cost", cost, model_index, "model_index")
    if edges.ndim == 3:
      edges = _pick("binning.edges", edges, model_index, "model_index")
    if model is not None and np.ndim(model.loss) == 3:
      model = ExitModel(*(_pick(f"model.{f}", np.asarray(a), model_index, "model_index")
                          for f, a in zip(ExitModel._fields, model)))
  elif threshold.ndim == 3:
    if model_index is not None:
      raise ValueError(f"model_index: the policy is not batched over models "
                       f"(threshold shape {threshold.shape}), got {model_index}")
  else:
    raise ValueError(f"policy.threshold: expected shape [L, K, S] or [M, L, K, S], "
                     f"got {threshold.shape}")
  l_count, k, s = threshold.shape
  if lam.shape != (l_count,) or value.shape != (l_count,):
    raise ValueError(f"policy.lam/value: expected shape [L] = ({l_count},), got "
                     f"{lam.shape} and {value.shape}")
  if loss.shape != (k, s):
    raise ValueError(f"policy.loss: expected shape [K, S] = ({k}, {s}) like the "
                     f"threshold table, got {loss.shape}")
  if cost.shape != (k,):
    raise ValueError(f"policy.cost: expected shape [K] = ({k},), got {cost.shape}")
  if edges.shape != (k, s + 1):
    raise ValueError(f"binning.edges: expected shape [K, S+1] = ({k}, {s + 1}) to match "
                     f"the policy's K={k} ramps and S={s} bins, got {edges.shape}")
  entry = signals.get(binning.signal, "binning.signal")
  if entry.needs_calibration and (binning.calibration is None
                                  or not class_weights_ok(binning.calibration, k)):
    raise ValueError(f"binning.calibration: expected finite weights [K-1={k - 1}, 2C+3] "
                     f"for a 'class' binning, got shape {np.shape(binning.calibration)}")
  if model is not None:
    if not isinstance(model, ExitModel):
      raise ValueError(f"model: expected jexit.ExitModel, got {type(model).__name__}")
    m_loss = np.asarray(model.loss)
    for name, a in (("model.loss", m_loss), ("model.cost", np.asarray(model.cost))):
      if a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
    if m_loss.shape != (k, s):
      raise ValueError(f"model.loss: expected shape [K, S] = ({k}, {s}) like the "
                       f"policy, got {m_loss.shape}")
    # The solver stores loss in its working dtype: compare in that dtype.
    if not np.array_equal(m_loss.astype(loss.dtype), loss):
      raise ValueError("model.loss: differs from policy.loss; the policy was not "
                       "solved from this model")
    if not np.allclose(np.asarray(model.cost, np.float64), cost.astype(np.float64),
                       rtol=1e-6, atol=0):
      raise ValueError(f"model.cost: {np.asarray(model.cost).tolist()} differs from "
                       f"policy.cost {cost.tolist()}")
  _pick("policy.lam", lam, lam_index, "lam_index")
  lam_index = int(lam_index) % l_count
  dtype = loss.dtype if loss.dtype in (np.float32, np.float64) else np.dtype(np.float64)
  cost64 = np.asarray(model.cost if model is not None else cost, np.float64)
  fields = {
      "signal": binning.signal,
      "lam": float(lam[lam_index]),
      "recall": bool(policy.recall),
      "num_ramps": int(k),
      "num_bins": int(s),
      "cost": [float(c) for c in cost64],
      "dtype": np.dtype(dtype).name,
      "value": float(value[lam_index]) if np.isfinite(value[lam_index]) else None,
      "lam_index": lam_index,
      "model_index": None if model_index is None else int(model_index),
  }
  return (fields, edges, loss.astype(dtype), threshold[lam_index].astype(dtype), cost64)


def export_policy(path, policy: Policy, binning: Binning, model: Optional[ExitModel],
                  lam_index: int, *, model_index: Optional[int] = None,
                  traces: Optional[Traces] = None,
                  trace_hash: Optional[str] = None) -> dict:
  """Writes one policy of a solve to a self-describing `.npz` (format version 1).

  The file holds `edges [K, S+1]`, `loss [K, S]`, `threshold [K, S]`,
  `cost [K]` (and, for a "class" signal, its weights `calibration
  [K-1, 2C+3]`) and a JSON `header` (format name and version, jexit version,
  binned signal, lam, recall, K, S, costs, dtype, sha256 of the fit trace).
  Everything is validated with the same checks the loader applies before the
  file is written (atomically, via a temporary file and a rename).

  Args:
    path: where to write (any name; `.npz` is conventional).
    policy: from `jexit.solve`, `threshold [L, K, S]` or `[M, L, K, S]`.
    binning: the `Binning` from `jexit.fit` for the same model.
    model: the `ExitModel` the policy was solved from (checked), or None.
    lam_index: which lam of `policy.lam` to export.
    model_index: which model, when the policy is batched over models.
    traces: the fit trace; its `trace_sha256` goes into the header.
    trace_hash: the hash itself, if the trace is not at hand.

  Returns:
    The header written (a dict).

  Examples:
    >>> model, binning = jexit.fit(traces)                       # doctest: +SKIP
    >>> policy = jexit.solve(model, np.array([0.1, 1.0]))       # doctest: +SKIP
    >>> export_policy("policy.npz", policy, binning, model, 0, traces=traces)  # doctest: +SKIP
  """
  if traces is not None and trace_hash is not None:
    raise ValueError("traces, trace_hash: pass one of them, not both")
  digest = trace_sha256(traces) if traces is not None else trace_hash
  if digest is not None and not isinstance(digest, str):
    raise ValueError(f"trace_hash: expected a sha256 hex string, got {type(digest).__name__}")
  fields, edges, loss, threshold, cost = policy_arrays(
      policy, binning, model, lam_index, model_index=model_index)
  import jexit  # at call time: the package is fully imported by then
  header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "jexit_version": str(getattr(jexit, "__version__", "unknown")),
            "trace_sha256": digest, **fields}
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"path: expected a policy file to write, got the folder {path}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"path: the folder {folder} of {path} does not exist")
  check_header(header, path)
  edges, loss, threshold, cost = check_arrays(header, edges, loss, threshold, cost, path)
  calibration = check_calibration(
      header, (np.asarray(binning.calibration, np.float64)
               if signals.get(binning.signal).needs_calibration else None),
      path)
  extra = {} if calibration is None else {"calibration": calibration}
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, header=np.array(json.dumps(header, sort_keys=True)),
                          edges=edges, loss=loss, threshold=threshold, cost=cost, **extra)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return header


# ------------------------------------------------------------- the subcommand

def add_export_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `jexit export TRACE (--lam X | --max-loss Y) --out FILE`.

  `subparsers` is what `ArgumentParser.add_subparsers()` returns; the parser
  gets `func=run_export` as a default.
  """
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
                           "is at most this (jexit.frontiers.DEFAULT_FIT candidates)")
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
                      "experiments/UNION.md measured the rule); 'solver' exports the solved "
                      "policy (with --lam, always)")
  p.add_argument("--paper", action="store_true",
                 help="the paper's model: uniform 0.08 bins, loss = 1 - conf")
  p.add_argument("--seed", type=int, default=0, help="seed of the fit split (--max-loss)")
  p.add_argument("--block", type=int, default=1,
                 help="split rows in blocks of this many related rows (--max-loss)")
  p.add_argument("--grid", type=int, default=1000,
                 help="lam values per candidate model tried by --max-loss (default 1000)")
  p.add_argument("--signal", choices=("auto",) + signals.NAMES,
                 default=None,
                 help="exit signal of the model: 1-conf, stability (1 - conf, plus 1 where "
                      "the prediction changed since the previous ramp), class (a "
                      "per-class calibration of 1 - conf, shipped in the table), the "
                      "trace's signal, or auto (chosen on the fit rows by inner cross-fitting, as "
                      "`jexit budget`; --max-loss only). Default: auto with --max-loss, "
                      "else 1-conf (the trace's signal if it has one)")
  from jexit.cli import signal_range_arg  # pylint: disable=import-outside-toplevel
  p.add_argument("--signal-range", type=signal_range_arg, dest="signal_range", default=None,
                 help="LO,HI: the whole range of the trace's own signal, the outer bin edges "
                      "(default: the fit rows' range; e.g. 0,1 for a margin, so the runtime "
                      "serves held-out values beyond it)")
  p.set_defaults(func=run_export)
  return p


def run_export(args) -> int:
  """Runs `jexit export` from parsed `args`; prints one summary line."""
  # The solver side needs JAX; keep it off this module's import.
  from jexit.fit import fit  # pylint: disable=import-outside-toplevel
  from jexit import frontiers  # pylint: disable=import-outside-toplevel
  from jexit.baselines import threshold_policy  # pylint: disable=import-outside-toplevel
  from jexit.solver import solve  # pylint: disable=import-outside-toplevel
  from jexit.traces import load_traces  # pylint: disable=import-outside-toplevel

  traces = load_traces(args.trace)
  recall = not args.no_recall
  options = dict(frontiers.PAPER_FIT) if args.paper else {}
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
  best = args.method in ("best", None) and args.lam is None
  if args.lam is not None:
    if not (np.isfinite(args.lam) and args.lam >= 0):
      raise ValueError(f"--lam: expected a finite value >= 0, got {args.lam}")
    if signals.get(options.get("signal") or "1-conf").needs_calibration:
      options["class_block"] = args.block  # its inner folds keep related rows together
    model, binning = fit(traces, **options)
    policy = solve(model, np.array([args.lam]), recall=recall)
    lam_index, note = 0, " (fitted on all of TRACE)"
  else:
    low = 0 if args.metric == "agreement" else -1
    if not (np.isfinite(args.max_loss) and low <= args.max_loss <= 1):
      raise ValueError(f"--max-loss: expected an {args.metric}-loss budget in [{low}, 1], "
                       f"got {args.max_loss}")
    method = "recall" if recall else "norecall"
    # As `jexit budget`: the exit signal (auto) and, for accuracy, the loss
    # target are chosen on the fit rows by inner cross-fitting.
    families = frontiers.model_families(traces, options, signal=signal, metric=args.metric)
    if len(families) > 1:
      chosen, _ = frontiers.choose_family(traces, args.max_loss, families, seed=args.seed,
                                          block=args.block, fit_options=options,
                                          num_lambdas=args.grid, metric=args.metric)
      options.update(families[chosen if chosen is not None else next(iter(families))])
    # best: every deployable method (`jexit budget`'s pool), less recall with --no-recall.
    rivals = tuple(m for m in frontiers.DEPLOYABLE
                   if m != method and (recall or m != "recall")) if best else ()
    fr = frontiers.frontier(traces, methods=(method,) + rivals, seed=args.seed,
                            block=args.block, num_lambdas=args.grid, fit_options=options,
                            apparate_budgets=((args.max_loss,) if args.metric == "agreement"
                                              else frontiers.APPARATE_BUDGETS),
                            metric=args.metric)
    if rivals:  # the deployable method with the most fit speedup, as `jexit budget`
      best = frontiers.best_method(frontiers.choose(fr, args.max_loss, args.metric))
      method = best or method
    fit_ev, test_ev = fr.splits[0][method]
    score = args.metric
    ref = fr.backbone_fit_accuracy[0] if score == "accuracy" else 1.0
    i = frontiers.choose_index(fit_ev, args.max_loss, metric=score, reference=ref)
    if i is None:
      raise ValueError(f"--max-loss: no policy reaches {score} >= {ref - args.max_loss:.4g} "
                       f"on the fit rows; the best is "
                       f"{float(np.max(getattr(fit_ev, score))):.4g}")
    if method in ("recall", "norecall"):
      policy, lam_index, model, binning = frontiers.candidate_policy(fr, method, i)
    else:  # per-ramp confidence thresholds as a table
      param = frontiers._param_value(fr, method, 0, i)  # pylint: disable=protected-access
      thresholds = param + [0.0] if isinstance(param, list) else param
      policy, binning = threshold_policy(thresholds, traces.cost)
      lam_index, model = 0, None
    note = (f"; {method}" + (" (best on the fit rows)" if rivals else "") + f", chosen on {fr.split['fit_rows']} fit rows ({score} "
            f"{float(getattr(fit_ev, score)[i]):.4f}, speedup {float(fit_ev.speedup[i]):.2f}x), "
            f"held-out {fr.split['test_rows']} rows: {score} "
            f"{float(getattr(test_ev, score)[i]):.4f}, speedup {float(test_ev.speedup[i]):.2f}x")
  header = export_policy(args.out, policy, binning, model, lam_index, traces=traces)
  print(f"wrote {args.out}: K={header['num_ramps']} S={header['num_bins']} "
        f"lam={header['lam']:.6g} recall={header['recall']} signal={header['signal']}{note}")
  return 0
