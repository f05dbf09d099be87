"""A lever of issue 7 measured: the state-conditioned model `trans[k, x, a, b]`.

`jexit.fit(..., history=alpha)` conditions each transition on the recall
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
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import frontiers as jf  # pylint: disable=wrong-import-position
from experiments import workloads  # pylint: disable=wrong-import-position
from experiments.quality import EXTERNAL, TARGETS, per_fold  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--alphas", default="32,128", help="history shrinkage strengths (pseudo-rows)")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  alphas = tuple(float(a) for a in args.alphas.split(","))
  names = ["default"] + [f"history={a:g}" for a in alphas]
  wins = dict.fromkeys(names, 0)
  gains = {n: [] for n in names[1:]}  # held-out speedup minus the default's
  noise = []  # fold standard deviation of the default's speedup
  total = 0
  print("| workload | " + " | ".join(f"loss <= {t * 100:g}%: " + " / ".join(names)
                                     + " vs best baseline" for t in TARGETS) + " |")
  print("|---|" + "---:|" * len(TARGETS))
  for name, traces in workloads.suite().items():
    block = 4 if name.startswith("digits") else 1
    start = time.perf_counter()
    kw = dict(folds=args.folds, block=block, num_lambdas=args.num_lambdas)
    frs = {"default": jf.frontier(traces, methods=("recall",) + EXTERNAL, **kw)}
    for a, n in zip(alphas, names[1:]):
      frs[n] = jf.frontier(traces, methods=("recall",), fit_options={"history": a}, **kw)
    cells = []
    for t in TARGETS:
      speed = {n: per_fold(fr, "recall", t)[0] for n, fr in frs.items()}
      rival = max(per_fold(frs["default"], m, t)[0].mean() for m in EXTERNAL)
      for n in names:
        wins[n] += speed[n].mean() >= rival - 1e-9
      for n in names[1:]:
        gains[n].append(speed[n].mean() - speed["default"].mean())
      noise.append(speed["default"].std())
      total += 1
      cells.append(" / ".join(f"{speed[n].mean():.3f}" for n in names) + f" vs {rival:.3f}")
    print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - start:.0f} s)",
          flush=True)
  print(f"\nat least as fast as the best external baseline (of {total} cells): "
        + ", ".join(f"{n} {wins[n]}" for n in names))
  print(f"fold standard deviation of the default's held-out speedup: median "
        f"{np.median(noise):.3f}x, max {np.max(noise):.3f}x")
  for n in names[1:]:
    g = np.array(gains[n])
    print(f"{n} minus default: median {np.median(g):+.3f}x, min {g.min():+.3f}x, "
          f"max {g.max():+.3f}x, >= default on {int((g >= -1e-9).sum())} of {total} cells")


if __name__ == "__main__":
  main()
