"""A lever of issue 7 measured: the state-conditioned model `trans[k, x, a, b]`.

`jexit.contrib.fit(..., history=alpha)` conditions each transition on the recall
state x (the best loss so far) as well as the current bin, shrunk towards the
Markov row with alpha pseudo-rows; the recall policy is solved on it. Protocol
and scoreboard as experiments/quality.py (5-fold cross-fitting, digits blocks
of 4; `1 - conf` signal; the default fit otherwise: S in {16, 32, 64}, logistic
loss): default recall vs recall with `history=alpha`, against the best
external baseline (global threshold, Apparate greedy, patience).

Usage:
  python experiments/history.py [--alphas 32,128] [--folds 5] [--num-lambdas 300]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import contrib, protocol  # pylint: disable=wrong-import-position
from experiments.quality import compare_variants  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--alphas", default="32,128", help="history shrinkage strengths (pseudo-rows)")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  alphas = tuple(float(a) for a in args.alphas.split(","))
  names = ["default"] + [f"history={a:g}" for a in alphas]

  def variants(_name, traces, kw, _default):
    return {n: protocol.frontier(traces, methods=("recall",),
                                 candidates=contrib.candidates(history=a), **kw)
            for a, n in zip(alphas, names[1:])}

  compare_variants(names, variants, args.folds, args.num_lambdas)


if __name__ == "__main__":
  main()
