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
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import contrib, protocol  # pylint: disable=wrong-import-position
from experiments.quality import compare_variants  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--factors", default="0.25,0.5,2,4")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  factors = tuple(float(x) for x in args.factors.split(","))

  def variants(_name, traces, kw, _default):
    return {"tilted": protocol.frontier(traces, methods=("recall",),
                                        candidates=contrib.tilted(factors), **kw)}

  print(f"factors {factors}")
  compare_variants(["default", "tilted"], variants, args.folds, args.num_lambdas)


if __name__ == "__main__":
  main()
