"""A lever of issue 7 measured: parametric transitions fitted by maximum likelihood.

`jexit.contrib.fit(..., trans_model="parametric", trans_strength=s)` replaces each
transition row by a heteroscedastic ordered-probit row (2 + (S - 1)
parameters per ramp transition, fitted with optax), alone (s = inf) or as s
pseudo-rows mixed into the smoothed counts. Protocol and scoreboard as
experiments/quality.py (5-fold cross-fitting, digits blocks of 4; `1 - conf`
signal; the default fit otherwise: S in {16, 32, 64}, logistic loss): default
recall vs recall with the parametric transitions, against the best external
baseline (global threshold, Apparate greedy, patience). Then, as a check of
the model rather than the policy: the held-out log-likelihood of the bin paths
(per row, summed over the ramp transitions) under each transition model minus
under the default counts, mean over the same folds, per bin count S.

Usage:
  python experiments/parametric.py [--strengths inf,32] [--folds 5] [--num-lambdas 300]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import contrib, protocol  # pylint: disable=wrong-import-position
from jexit import traces as jt  # pylint: disable=wrong-import-position
from experiments.quality import compare_variants  # pylint: disable=wrong-import-position


def heldout_loglik(traces, folds, block, strengths, num_bins):
  """`{S: [mean held-out log-likelihood gain per row, one per strength]}` over counts."""
  gain = {}
  for s_count in num_bins:
    ll = np.zeros((folds, 1 + len(strengths)))
    for f, (fit_rows, test_rows) in enumerate(jt.fold_rows(traces.num_inputs, folds,
                                                           block=block)):
      for j, s in enumerate((None,) + strengths):
        opts = {} if s is None else {"trans_model": "parametric", "trans_strength": s}
        model, binning = contrib.fit(traces, rows=fit_rows, num_bins=s_count, **opts)
        b = binning.assign(traces.take(test_rows).exit_signal())
        ramp = np.arange(b.shape[1] - 1)[None, :]
        ll[f, j] = np.log(model.trans[ramp, b[:, :-1], b[:, 1:]]).sum(1).mean()
    gain[s_count] = (ll[:, 1:] - ll[:, :1]).mean(0)
  return gain


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--strengths", default="inf,32",
                 help="pseudo-rows of the parametric row per count row (inf: parametric alone)")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--num-lambdas", type=int, default=300)
  args = p.parse_args()
  strengths = tuple(float(s) for s in args.strengths.split(","))
  names = ["default"] + [f"parametric={s:g}" for s in strengths]
  loglik = {}

  def variants(name, traces, kw, _default):
    loglik[name] = heldout_loglik(traces, args.folds, kw["block"], strengths,
                                  protocol.DEFAULT_FIT["num_bins"])
    return {n: protocol.frontier(traces, methods=("recall",), candidates=contrib.candidates(
        trans_model="parametric", trans_strength=s), **kw)
            for s, n in zip(strengths, names[1:])}

  compare_variants(names, variants, args.folds, args.num_lambdas)
  sizes = protocol.DEFAULT_FIT["num_bins"]
  print("\nheld-out log-likelihood of the bin paths minus the counts model's (nats per row; "
        + " / ".join(names[1:]) + ")")
  print("| workload | " + " | ".join(f"S = {s}" for s in sizes) + " |")
  print("|---|" + "---:|" * len(sizes))
  for name, gain in loglik.items():
    print(f"| {name} | " + " | ".join(" / ".join(f"{g:+.3f}" for g in gain[s]) for s in sizes)
          + " |")


if __name__ == "__main__":
  main()
