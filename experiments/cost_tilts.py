"""A lever of issue 7 measured and not adopted: candidate policies from tilted costs.

A lam sweep of one model only reaches the vertices of the convex hull of its
frontier. Solving the same fitted model with one ramp's cost multiplied by a
factor (one ramp at a time) gives more Bellman-optimal policies (optimal for a
reweighted objective) to choose from on the fit rows, at (1 + len(factors) *
(K - 1)) times the policies. Protocol and scoreboard as experiments/quality.py
(5-fold cross-fitting, digits blocks of 4; `1 - conf` signal): default recall
vs recall with the extra candidates, against the best external baseline.

Usage:
  python experiments/cost_tilts.py [--factors 0.25,0.5,2,4] [--folds 5] [--num-lambdas 300]
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import frontiers as jf  # pylint: disable=wrong-import-position
from experiments import workloads  # pylint: disable=wrong-import-position
from experiments.quality import EXTERNAL, TARGETS, per_fold  # pylint: disable=wrong-import-position


@contextlib.contextmanager
def tilted_candidates(factors):
  """Within the block, `frontier` fits each candidate model and adds its tilts."""
  plain = jf.fit_candidates

  def fit_candidates(traces, rows, options):
    out = []
    for model, binning in plain(traces, rows, options):
      out.append((model, binning))
      for ramp in range(len(model.cost) - 1):
        for f in factors:
          cost = np.array(model.cost, np.float64)
          cost[ramp] *= f
          out.append((model._replace(cost=cost), binning))
    return out

  jf.fit_candidates = fit_candidates
  try:
    yield
  finally:
    jf.fit_candidates = plain


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--factors", default="0.25,0.5,2,4")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  factors = tuple(float(x) for x in args.factors.split(","))
  wins = {"default": 0, "tilted": 0}
  total = 0
  print("| workload | " + " | ".join(f"loss <= {t * 100:g}%: default / tilted vs best baseline"
                                     for t in TARGETS) + " |")
  print("|---|" + "---:|" * len(TARGETS))
  for name, traces in workloads.suite().items():
    block = 4 if name.startswith("digits") else 1
    start = time.perf_counter()
    kw = dict(folds=args.folds, block=block, num_lambdas=args.num_lambdas)
    base = jf.frontier(traces, methods=("recall",) + EXTERNAL, **kw)
    with tilted_candidates(factors):
      tilt = jf.frontier(traces, methods=("recall",), **kw)
    cells = []
    for t in TARGETS:
      ours, more = per_fold(base, "recall", t)[0].mean(), per_fold(tilt, "recall", t)[0].mean()
      rival = max(per_fold(base, m, t)[0].mean() for m in EXTERNAL)
      wins["default"] += ours >= rival - 1e-9
      wins["tilted"] += more >= rival - 1e-9
      total += 1
      cells.append(f"{ours:.3f} / {more:.3f} vs {rival:.3f}")
    print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - start:.0f} s)",
          flush=True)
  print(f"\nat least as fast as the best external baseline: default {wins['default']} of "
        f"{total}, tilted {wins['tilted']} of {total} (factors {factors})")


if __name__ == "__main__":
  main()
