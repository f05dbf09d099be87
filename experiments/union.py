"""Recall or a baseline, whichever is faster on the fit rows (a lever of issue 7).

Per fold and target, the default recall policy and the baselines in
`--pool` each choose their parameter on the fit rows as usual (most fit
speedup within the target); the union then keeps the member whose chosen
parameter has the most fit speedup and is scored on the held-out fold.
Same protocol, workloads and scoreboard as experiments/quality.py. The last
default pool (recall, no recall, Apparate greedy, global threshold) is the rule
of `jexit budget`'s "best" line and `jexit export --method best`
(`jexit.frontiers.best_method`).

Usage:
  python experiments/union.py [--folds 5] [--num-lambdas 300]
      [--pool apparate_greedy,global_threshold]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import frontiers as jf  # pylint: disable=wrong-import-position
from experiments import quality, workloads  # pylint: disable=wrong-import-position


def union_per_fold(fr, members, target):
  """Held-out speedup per fold of the member with the most fit speedup, and
  how often each member was picked."""
  speed, picked = [], dict.fromkeys(members, 0)
  for split in fr.splits:
    best = (-np.inf, 1.0, None)  # (fit speedup, held-out speedup, member)
    for m in members:
      fit_ev, test_ev = split[m]
      i = jf.choose_index(fit_ev, target)
      if i is not None and float(fit_ev.speedup[i]) > best[0]:
        best = (float(fit_ev.speedup[i]), float(test_ev.speedup[i]), m)
    speed.append(best[1])
    if best[2] is not None:
      picked[best[2]] += 1
  return np.array(speed), picked


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--num-lambdas", type=int, default=300)
  parser.add_argument("--pool", default="apparate_greedy;apparate_greedy,global_threshold;"
                                        "norecall,apparate_greedy,global_threshold",
                      help="';'-separated pools of baselines to join with recall")
  args = parser.parse_args(argv)
  pools = [tuple(p.split(",")) for p in args.pool.split(";")]
  names = ["default"] + ["recall+" + "+".join(p) for p in pools]
  picks = {n: {} for n in names[1:]}
  board = quality.Scoreboard(names)
  for name, traces in workloads.suite().items():
    block = 4 if name.startswith("digits") else 1
    start = time.perf_counter()
    fr = jf.frontier(traces, folds=args.folds, block=block, num_lambdas=args.num_lambdas,
                     methods=("recall", "norecall") + quality.EXTERNAL)
    cells = []
    for t in quality.TARGETS:
      speed = {"default": quality.per_fold(fr, "recall", t)[0]}
      for n, pool in zip(names[1:], pools):
        speed[n], picked = union_per_fold(fr, ("recall",) + pool, t)
        for m, c in picked.items():
          picks[n][m] = picks[n].get(m, 0) + c
      rival = max(quality.per_fold(fr, m, t)[0].mean() for m in quality.EXTERNAL)
      cells.append(board.cell(speed, rival))
    board.row(name, cells, start)
  board.summary(noise=False,
                notes={n: f"; picked (folds x targets): {picks[n]}" for n in names[1:]})


if __name__ == "__main__":
  main()
