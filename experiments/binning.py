"""A lever of issue 7 measured: finer bins where the stopping decisions are made.

`jexit.contrib.fit(..., quantile_power=p)` puts ramp k's inner edge i at the quantile
level `(i / S) ** p` of its fit rows' `1 - conf`: p > 1 gives finer bins among
the most confident inputs, where the stop thresholds of tight loss budgets sit
at the first ramps (on the digits VGG-11 traces the chosen policies stop 5-11%
of the inputs at the first ramp at 0.5% and 1% loss), p < 1 finer bins among
the least confident (a later ramp stops 75-90% of the inputs that reach it).
Protocol and scoreboard as experiments/quality.py (5-fold cross-fitting,
digits blocks of 4; the default fit otherwise: S in {16, 32, 64}, logistic
loss): default recall vs recall with each p, and with candidates pooled over
several p (and the three S, as the default pools over S), against the best
external baseline (global threshold, Apparate greedy, patience). A pool of
several p has more candidate policies to choose from on the fit rows, which
can help by itself (experiments/cost_tilts.py); the controls pool as many
candidates from a denser grid of bin counts S at p = 1. Last, a data-driven
variant ("refined"): per fold, the default candidates are fitted and solved on
the fit rows, the policy each would choose at each loss target (on the fit
rows) marks, per ramp, the quantile level of its stop boundary (the least
confident fit row that stops there), and each candidate is refitted with half
of its S - 1 inner edges packed within one bin width of those levels (the
other half at equal-count levels): the same S, with bins S / (4 n) times
finer than equal-count ones near n distinct boundary levels (4x at S = 64
when the four targets' boundaries lie apart, more where they coincide, none
at S = 16) and 2x coarser elsewhere.

Usage:
  python experiments/binning.py [--powers 0.5,1.5,2,3] [--pools 1,2:0.5,1,2]
      [--controls 16,24,32,48,64,96:12,16,24,32,40,48,64,80,96] [--refine-share 0.5]
      [--folds 5] [--num-lambdas 300]
"""

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jexit  # pylint: disable=wrong-import-position
from jexit import contrib, protocol, select  # pylint: disable=wrong-import-position
from experiments.quality import (  # pylint: disable=wrong-import-position
    TARGETS, candidates_with, compare_variants)


def pooled_powers(powers):
  """Candidate models fitted once per power."""
  return candidates_with(lambda plain, traces, rows, options: [
      c for p in powers for c in plain(traces, rows, options,
                                       fit_fn=functools.partial(contrib.fit, quantile_power=p))])


def stop_levels(traces, rows, model, binning, num_lambdas):
  """Per ramp but the last: quantile levels (among the fit rows) of the stop
  boundary of the policy chosen on the fit rows at each loss target."""
  fit_t = traces.take(rows)
  values = fit_t.exit_signal()
  policy = jexit.solve(model, protocol.default_lambdas(model, num_lambdas), recall=True)
  ev = jexit.evaluate(policy, fit_t, binning, return_per_input=True)
  levels = [[] for _ in range(values.shape[1] - 1)]
  for t in TARGETS:
    i = select.choose_index(ev, t)
    if i is None:
      continue
    stop = np.asarray(ev.stop_ramp[i])
    for r, out in enumerate(levels):
      if (stop == r).any():
        out.append(float(np.mean(values[:, r] <= values[stop == r, r].max())))
  return levels


def refined_edges(values, levels, num_bins, share):
  """`[K, S+1]` edges: `share` of the inner edges within one bin width of each
  ramp's `levels`, the rest at equal-count levels (all of them on ramps
  without levels)."""
  moved = int(round(share * (num_bins - 1)))
  edges = np.empty((values.shape[1], num_bins + 1))
  for r in range(values.shape[1]):
    u = np.unique(levels[r]) if r < len(levels) else np.array([])
    if u.size and moved:
      per = -(-moved // u.size)
      near = np.sort((u[:, None] + np.linspace(-1, 1, per)[None, :] / num_bins).ravel())
      near = near[np.round(np.linspace(0, near.size - 1, moved)).astype(int)]
      q_levels = np.sort(np.concatenate([np.linspace(0, 1, num_bins - moved + 1)[1:-1],
                                         np.clip(near, 0, 1)]))
    else:
      q_levels = np.linspace(0, 1, num_bins + 1)[1:-1]
    e = np.concatenate([[0.0], np.quantile(values[:, r], q_levels), [1.0]])
    for i in range(1, len(e)):  # equal quantiles: nudge apart (empty bins, smoothed)
      e[i] = max(e[i], e[i - 1] + 1e-9)
    edges[r] = e
  return edges


def refined_candidates(share, num_lambdas):
  """Candidates refitted with finer bins at their own stop boundaries (found
  on the same fit rows)."""

  def make(plain, traces, rows, options):
    values = traces.take(rows).exit_signal()
    out = []
    for model, binning in plain(traces, rows, options):
      s = binning.num_bins
      edges = refined_edges(values, stop_levels(traces, rows, model, binning, num_lambdas), s,
                            share)
      out.append(jexit.fit(traces, rows=rows, **{**options, "bins": edges, "num_bins": s}))
    return out

  return candidates_with(make)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--powers", default="0.5,1.5,2,3", help="quantile powers p, one fit each")
  p.add_argument("--pools", default="1,2:0.5,1,2",
                 help="sets of powers whose candidates are pooled (':' between sets)")
  p.add_argument("--controls", default="16,24,32,48,64,96:12,16,24,32,40,48,64,80,96",
                 help="grids of bin counts S pooled at p = 1 (':' between grids)")
  p.add_argument("--refine-share", type=float, default=0.5,
                 help="share of the inner edges packed near the pilot's stop boundaries "
                      "(0: no refined variant)")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  powers = tuple(float(x) for x in args.powers.split(",")) if args.powers else ()
  pools = [tuple(float(x) for x in s.split(",")) for s in args.pools.split(":") if s]
  controls = [tuple(int(x) for x in s.split(",")) for s in args.controls.split(":") if s]
  names = (["default"] + [f"p={x:g}" for x in powers]
           + ["pool " + ",".join(f"{x:g}" for x in s) for s in pools]
           + [f"S={s[0]}..{s[-1]} ({len(s)})" for s in controls]
           + (["refined"] if args.refine_share > 0 else []))

  def variants(_name, traces, kw, default):
    # One lam grid for every variant (the default's), so only the bins differ.
    kw = {**kw, "lambdas": default.lambdas}
    frs = {}
    for x, n in zip(powers, names[1:]):
      frs[n] = protocol.frontier(traces, methods=("recall",),
                                 candidates=contrib.candidates(quantile_power=x), **kw)
    for s, n in zip(pools, names[1 + len(powers):]):
      frs[n] = protocol.frontier(traces, methods=("recall",), candidates=pooled_powers(s), **kw)
    for s, n in zip(controls, names[1 + len(powers) + len(pools):]):
      frs[n] = protocol.frontier(traces, methods=("recall",), fit_options={"num_bins": s}, **kw)
    if args.refine_share > 0:
      frs["refined"] = protocol.frontier(
          traces, methods=("recall",),
          candidates=refined_candidates(args.refine_share, args.num_lambdas), **kw)
    return frs

  compare_variants(names, variants, args.folds, args.num_lambdas)


if __name__ == "__main__":
  main()
