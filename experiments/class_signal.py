"""The "class" exit signal, held out (a lever of issue 7).

A ramp's confidence means different things for different predicted classes.
`jexit.fit(..., signal="class")` bins, per ramp, one minus a logistic estimate
that the ramp agrees with the final ramp given its confidence, its predicted
class (and their interaction) and whether it agrees with the previous ramp
(`jexit.fit.fit_class_calibration`, weights fitted on the fit rows and
shipped in the policy table). The model itself is fitted on cross-fitted
scores of the fit rows (`cross_fitted_class_signal`), and the fit rows are
scored with them when lam is chosen.

Per workload, outer split seed and fold (the protocol of quality.py: 5 folds,
blocks of 4 rows on digits, every parameter chosen on the fit rows), the
held-out speedup and pooled held-out agreement of:
- `recall [1-conf]`: the recall policy with DEFAULT_FIT (the traces' 1 - conf);
- `recall [class]`: the same with `signal="class"`;
- `recall [class, in-sample]`: the class scores of the fit rows come from the
  weights fitted on those same rows (no inner cross-fitting), the variant
  that lost: its policies miss their agreement target held out;
- the best external baseline (global threshold, Apparate greedy, patience).

Usage:
  python experiments/class_signal.py [--seeds 0] [--folds 5] [--num-lambdas 300]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jexit  # pylint: disable=wrong-import-position
from jexit import protocol, select  # pylint: disable=wrong-import-position
from jexit import traces as jt  # pylint: disable=wrong-import-position
from jexit.fit import fit_class_calibration  # pylint: disable=wrong-import-position
from jexit.runtime import class_signal  # pylint: disable=wrong-import-position
from experiments import quality, workloads  # pylint: disable=wrong-import-position

METHODS = ("recall [1-conf]", "recall [class]", "recall [class, in-sample]")


def in_sample_fold(traces, fit_rows, test_rows, num_lambdas):
  """`{target: (held-out speedup, held-out agreement)}` of recall on class
  scores whose weights were fitted on the fit rows and scored them too."""
  w = fit_class_calibration(traces, fit_rows)
  scored = traces._replace(signal=class_signal(traces.conf, traces.pred, w))
  options = protocol.merged_fit_options({"signal": "signal", "signal_range": (0.0, 1.0)})
  candidates = protocol.fit_candidates(scored, fit_rows, options)
  lambdas = protocol.default_lambdas(candidates[0][0], num_lambdas)
  fit_t, test_t = scored.take(fit_rows), scored.take(test_rows)
  fits, tests = [], []
  for model, binning in candidates:
    policy = jexit.solve(model, lambdas)
    fits.append(jexit.evaluate(policy, fit_t, binning))
    tests.append(jexit.evaluate(policy, test_t, binning))
  fit_ev, test_ev = protocol.pool(fits, traces.cost), protocol.pool(tests, traces.cost)
  out = {}
  for t in quality.TARGETS:
    i = select.choose_index(fit_ev, t)
    out[t] = (1.0, 1.0) if i is None else (float(test_ev.speedup[i]),
                                           float(test_ev.agreement[i]))
  return out


def run(traces, seed, folds, block, num_lambdas):
  """`{method: {target: (speedups per fold, pooled agreement)}}` on one outer split."""
  kw = dict(folds=folds, block=block, num_lambdas=num_lambdas, seed=seed)
  plain = protocol.frontier(traces, methods=("recall",) + quality.EXTERNAL, **kw)
  by_class = protocol.frontier(traces, methods=("recall",),
                         fit_options={**protocol.DEFAULT_FIT, "signal": "class"}, **kw)
  out = {"recall [1-conf]": {t: quality.per_fold(plain, "recall", t) for t in quality.TARGETS},
         "recall [class]": {t: quality.per_fold(by_class, "recall", t)
                            for t in quality.TARGETS}}
  per = [in_sample_fold(traces, f, h, num_lambdas)
         for f, h in jt.fold_rows(traces.num_inputs, folds, seed=seed, block=block)]
  sizes = np.array([len(h) for _, h in jt.fold_rows(traces.num_inputs, folds, seed=seed,
                                                     block=block)])
  out["recall [class, in-sample]"] = {
      t: (np.array([p[t][0] for p in per]),
          float(np.sum([p[t][1] for p in per] * sizes) / sizes.sum()))
      for t in quality.TARGETS}
  for m in quality.EXTERNAL:
    out[m] = {t: quality.per_fold(plain, m, t) for t in quality.TARGETS}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0", help="comma-separated outer split seeds")
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--num-lambdas", type=int, default=300)
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  print(f"held-out speedup, mean over {len(seeds)} seed(s) x {args.folds} folds (pooled "
        f"held-out agreement); best external = the external baseline with the most mean "
        f"speedup\n")
  print("| workload | method | " + " | ".join(f"loss <= {t * 100:g}%" for t in quality.TARGETS)
        + " |")
  print("|---|---|" + "---|" * len(quality.TARGETS))
  start = time.perf_counter()
  for name, traces in workloads.suite().items():
    block = 4 if name.startswith("digits") else 1
    runs = [run(traces, seed, args.folds, block, args.num_lambdas) for seed in seeds]

    def cell(method, t):
      speed = np.mean([r[method][t][0].mean() for r in runs])
      agree = np.mean([r[method][t][1] for r in runs])
      return speed, agree

    for m in METHODS:
      cells = [cell(m, t) for t in quality.TARGETS]
      print(f"| {name} | {m} | " + " | ".join(f"{s:.3f}x ({a * 100:.1f}%)" for s, a in cells)
            + " |")
    best = []
    for t in quality.TARGETS:
      b = max(quality.EXTERNAL, key=lambda m: cell(m, t)[0])
      s, a = cell(b, t)
      best.append(f"{s:.3f}x ({a * 100:.1f}%) {b}")
    print(f"| {name} | best external | " + " | ".join(best) + " |", flush=True)
  print(f"\n({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  main()
