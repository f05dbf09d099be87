"""Evaluation throughput: replaying L policies on N inputs, and the whole `jexit sweep`.

Usage (from the repository root):

  python benchmarks/bench_eval.py                  # N = 10,000 test inputs, L = 1,000
  python benchmarks/bench_eval.py --inputs 20000 --lambdas 1000 --reps 3

Workload: the synthetic "overthink" trace of experiments/workloads.py (K = 5
ramps) with 2 * N inputs, so the sweep's default half/half split holds N test
inputs. Measured in one process (after a warm-up call, so compiles are
excluded, and reported separately):

- `jexit.evaluate(policy, traces, binning)` of L recall / no-recall policies
  on the N test inputs: inputs x policies per second (nominal N * L; the
  evaluator replays each distinct bin path once);
- `jexit.protocol.frontier(traces, num_lambdas=L)`, what `jexit sweep` runs
  (fit, solve, evaluate every candidate model on fit and test rows, every
  baseline), with the time per phase;
- `jexit sweep TRACE` as a fresh process (imports and compiles included).
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# On a GPU this process and the `jexit sweep` it starts share the device; JAX's
# default (take 75% of its memory at start) would leave the second too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _median(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


class PhaseTimer:
  """Wraps functions of a module namespace and sums their wall time by phase."""

  def __init__(self):
    self.seconds = collections.defaultdict(float)
    self._undo = []

  def wrap(self, namespace, name, phase):
    original = getattr(namespace, name)

    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return original(*args, **kwargs)
      finally:
        self.seconds[phase] += time.perf_counter() - t0

    setattr(namespace, name, timed)
    self._undo.append((namespace, name, original))

  def restore(self):
    for namespace, name, original in reversed(self._undo):
      setattr(namespace, name, original)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--inputs", type=int, default=10_000, help="N test inputs")
  parser.add_argument("--lambdas", type=int, default=1000, help="L lam values")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--no-cli", action="store_true", help="skip the `jexit sweep` process")
  args = parser.parse_args()

  import jax
  import jexit
  from jexit import baselines, protocol as frontiers
  from jexit.evaluation import evaluate
  from experiments.workloads import synthetic

  traces = synthetic("overthink", n=2 * args.inputs, k=5, seed=2)
  n, k = traces.conf.shape
  rows = np.random.default_rng(0).permutation(n)
  fit_t, test_t = traces.take(rows[:n // 2]), traces.take(rows[n // 2:])
  print(f"backend: {jax.default_backend()}, {os.cpu_count()} CPU cores; trace: synthetic "
        f"overthink, {n} inputs, K={k}; median of {args.reps}\n")

  # 1. evaluate alone.
  print("| what | S | L | N | distinct paths | seconds | inputs x policies / s |")
  print("|---|---|---|---|---|---|---|")
  for num_bins in (13, 32, 64):
    model, binning = jexit.fit(fit_t, num_bins=num_bins)
    lam = frontiers.default_lambdas(model, args.lambdas) if hasattr(
        frontiers, "default_lambdas") else np.geomspace(1e-4, 1, args.lambdas)
    for recall in (True, False):
      policy = jexit.solve(model, lam, recall=recall)
      jax.block_until_ready(policy.threshold)
      for method in ("sweep", "replay"):
        run = lambda: evaluate(policy, test_t, binning, method=method)
        run()  # compile
        secs = _median(run, args.reps)
        paths = len(np.unique(binning.assign(1 - test_t.conf), axis=0))
        what = f"evaluate {method}, {'recall' if recall else 'no recall'}"
        print(f"| {what} | {num_bins} | {len(lam)} | {test_t.num_inputs} | {paths} | "
              f"{secs:.3f} | {test_t.num_inputs * len(lam) / secs:,.0f} |")

  # 2. the sweep (frontier), warm, with phases.
  t0 = time.perf_counter()
  frontiers.frontier(traces, num_lambdas=args.lambdas)
  cold = time.perf_counter() - t0
  timer = PhaseTimer()
  timer.wrap(frontiers, "fit", "fit")
  timer.wrap(frontiers, "solve", "solve")
  timer.wrap(frontiers, "evaluate", "evaluate (recall, no recall)")
  for name in ("global_threshold", "apparate_greedy", "threshold_rule", "patience",
               "fixed_ramp", "backbone", "oracle"):
    timer.wrap(baselines, name, "baselines")
  runs = []
  for _ in range(args.reps):
    timer.seconds.clear()
    t0 = time.perf_counter()
    fr = frontiers.frontier(traces, num_lambdas=args.lambdas)
    runs.append((time.perf_counter() - t0, dict(timer.seconds)))
  timer.restore()
  total, phases = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
  print(f"\nfrontier(traces, num_lambdas={args.lambdas}) = `jexit sweep` in-process: "
        f"{total:.2f} s warm (median), {cold:.2f} s first call (compiles); "
        f"fit options {fr.fit_options}")
  print("| phase | seconds |")
  print("|---|---|")
  for phase, secs in sorted(phases.items(), key=lambda p: -p[1]):
    print(f"| {phase} | {secs:.2f} |")
  print(f"| other (splits, Pareto sets) | {total - sum(phases.values()):.2f} |")

  # 3. the command line, as a user runs it: without the persistent compilation
  # cache, then twice with a new one (the first run fills it).
  if not args.no_cli:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "trace.npz")
      jexit.save_traces(path, traces)
      cmd = [sys.executable, "-c", "import sys; from jexit.cli import main; sys.exit(main())",
             "sweep", path]
      print(f"\n`jexit sweep trace.npz` ({n} inputs) as a new process:")
      print("| compilation cache | seconds |")
      print("|---|---|")
      for label, cache in (("none (JEXIT_CACHE_DIR=)", ""),
                           ("empty (first run fills it)", os.path.join(tmp, "xla")),
                           ("filled", os.path.join(tmp, "xla"))):
        env = dict(os.environ, JEXIT_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        status = "" if done.returncode == 0 else f" (exit {done.returncode}: {done.stderr[-500:]})"
        print(f"| {label} | {wall:.2f}{status} |")
      t0 = time.perf_counter()
      subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.zeros(1)"],
                     check=True)
      print(f"| (for scale: `import jax` and one array, a new process) | "
            f"{time.perf_counter() - t0:.2f} |")

if __name__ == "__main__":
  main()
