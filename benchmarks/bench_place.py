"""Ramp placement's solve: every subset in one batched call vs one call per subset.

For K candidate ramps (a synthetic candidate trace, `jexit.subsets` models with
its defaults: 16 quantile bins per ramp, recall), the 2^(K-1) subset models x
L lam values are solved (a) by `jexit.subsets.solve_subsets(by_size=False)`, one
`jexit.solve` call on the `[M]` batch padded to the largest K (chunked only
above its memory budget), (b) by `solve_subsets(by_size=True)` (place's
default), one call per subset size, and (c) by a loop of `jexit.solve(model_A,
lam)` over the subsets. Each is run once untimed (compiles), then `--reps`
times in turn; the table gives medians, policies per second and the ratios,
all measured in the same process.

  python benchmarks/bench_place.py [--ks 8,10] [--lams 1000] [--reps 3]
"""

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

import jexit  # noqa: E402
from jexit.subsets import (enumerate_subsets, place_models, placement_lambdas,  # noqa: E402
                           solve_subsets, subset_model)


def candidates(k, n=2000, seed=0):
  """Candidate ramps that improve along the network; heads 0.3 of a segment."""
  rng = np.random.default_rng(seed)
  hard = rng.uniform(size=n)
  z = 3 * (np.linspace(0.1, 1, k)[None] - hard[:, None]) + rng.normal(0, 0.6, (n, k))
  conf = 0.5 + 0.5 / (1 + np.exp(-z))
  final = rng.integers(0, 10, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf ** 3, final[:, None], (final[:, None] + 1) % 10)
  pred[:, -1] = final
  return jexit.Traces(conf, pred, final, np.full(k, 1.3), head_cost=np.full(k, 0.3))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ks", default="8,10")
  ap.add_argument("--lams", type=int, default=1000)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}, float32, recall")
  print("| K | subsets | lam | policies | one padded call: s (calls) | one call per size: s "
        "(calls) | loop over subsets: s (calls) | padded policies/s | per-size policies/s | "
        "loop policies/s | loop / padded | loop / per-size |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for k in (int(v) for v in args.ks.split(",")):
    t = candidates(k)
    pieces = place_models(t)
    subsets = enumerate_subsets(k)
    models = [subset_model(pieces, a)[0] for a in subsets]
    lam = placement_lambdas(pieces, subsets, args.lams)

    def batched(by_size=False):
      pols, calls = solve_subsets(models, lam, by_size=by_size)
      np.asarray(pols[-1].threshold)
      return calls

    def loop():
      for m in models:
        np.asarray(jexit.solve(m, lam).threshold)

    calls = batched()  # compiles
    size_calls = batched(True)
    loop()
    tb, ts, tl = [], [], []
    for _ in range(args.reps):
      for fn, times in ((batched, tb), (lambda: batched(True), ts), (loop, tl)):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    mb, ms, ml = (statistics.median(v) for v in (tb, ts, tl))
    p = len(subsets) * len(lam)
    print(f"| {k} | {len(subsets)} | {len(lam)} | {p:,} | {mb:.2f} ({calls}) | "
          f"{ms:.2f} ({size_calls}) | {ml:.2f} ({len(subsets)}) | {p / mb:,.0f} | "
          f"{p / ms:,.0f} | {p / ml:,.0f} | {ml / mb:.2f} | {ml / ms:.2f} |", flush=True)


if __name__ == "__main__":
  main()
