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
      [--ways padded,size,loop]   # --ways size,loop skips (a), the slowest
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
  ap.add_argument("--ways", default="padded,size,loop",
                  help="which of padded, size, loop to time (comma-separated)")
  args = ap.parse_args()
  ways = args.ways.split(",")
  if not ways or set(ways) - {"padded", "size", "loop"}:
    ap.error(f"--ways: expected names from padded,size,loop; got {args.ways!r}")
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

    fns = {"padded": batched, "size": lambda: batched(True), "loop": loop}
    calls = {w: fns[w]() for w in ways}  # compiles
    calls["loop"] = len(subsets)
    times = {w: [] for w in ways}
    for _ in range(args.reps):
      for w in ways:
        s = time.perf_counter()
        fns[w]()
        times[w].append(time.perf_counter() - s)
    med = {w: statistics.median(v) for w, v in times.items()}
    p = len(subsets) * len(lam)
    sec = lambda w: f"{med[w]:.2f} ({calls[w]})" if w in med else "-"
    rate = lambda w: f"{p / med[w]:,.0f}" if w in med else "-"
    ratio = lambda w: f"{med['loop'] / med[w]:.2f}" if w in med and "loop" in med else "-"
    print(f"| {k} | {len(subsets)} | {len(lam)} | {p:,} | {sec('padded')} | {sec('size')} | "
          f"{sec('loop')} | {rate('padded')} | {rate('size')} | {rate('loop')} | "
          f"{ratio('padded')} | {ratio('size')} |", flush=True)


if __name__ == "__main__":
  main()
