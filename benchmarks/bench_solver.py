"""Solver throughput: policies/s, GFLOP/s against the machine's matmul rate, memory.

Usage (from the repository root):

  python benchmarks/bench_solver.py                 # the four configurations + baselines
  python benchmarks/bench_solver.py --big           # + 100,000 policies in one call
  python benchmarks/bench_solver.py --configs 13,3,1000,1 --reps 3

Every configuration (S bins, K ramps, L lam values, M models) runs in its own
subprocess, so its peak resident memory is its own; in it, timed `jnp.dot`
calls (n x n float32 at HIGHEST precision, as the solver's GEMMs; n = 4096, or
`--matmul-size`) alternate with timed `jexit.solve` calls, and the medians are
compared. On an accelerator the peak device memory is reported too. Model 0's
values and thresholds at 5 lam values are checked against a float64 numpy
recursion (`numpy_recall`). FLOPs counted: the GEMM only, 2 * X * S * S per ramp
transition (K - 1 of them) per policy, X = the recall state's size (K * S for
the random continuous losses used here).

Baselines (per-policy time, model 0 of every configuration at a few of its lam
values, against jexit's batch time / policies; `--no-baselines` skips them):
- QuantEcon `DiscreteDP` + `backward_induction` over states (ramp, x, s) plus an
  absorbing "stopped" state, sparse state-action-pair form, and the dense
  product form where Q [n, 2, n] fits (needs `pip install quantecon`, the
  `bench` extra);
- a plain-Python-loop backward induction (skipped above ~20 s per policy).
All are checked against jexit's values.
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(13, 3, 10000, 3), (32, 5, 4096, 8), (64, 16, 1024, 4), (128, 8, 256, 1)]
BIG = (32, 8, 12500, 8)  # 100,000 policies in one call
LOOP_MAX_INNER = 2e7  # the plain loop runs ~1 M steps/s: skip it above ~20 s per policy
DENSE_MAX_STATES = 4000  # QuantEcon's dense Q [n, 2, n] float64


def random_model(seed, s, k, m):
  """`[M]` random models: Dirichlet rows, continuous losses (X = K * S)."""
  import jexit
  rng = np.random.default_rng(seed)
  return jexit.ExitModel(init=rng.dirichlet(np.ones(s), size=m),
                         trans=rng.dirichlet(np.ones(s), size=(m, k - 1, s)),
                         loss=rng.uniform(size=(m, k, s)),
                         cost=rng.uniform(0.5, 1.5, size=(m, k)))


def rss_bytes():
  """Peak resident memory of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- baselines


def loop_solve(init, trans, loss, cost, lam):
  """Recall value by plain Python loops over (ramp, x, s, b): the naive port."""
  k_count, s_count = len(loss), len(loss[0])
  grid = sorted(set(float(v) for row in loss for v in row))
  pos = {v: i for i, v in enumerate(grid)}
  idx = [[pos[float(loss[k][s])] for s in range(s_count)] for k in range(k_count)]
  w_next = [[grid[x]] * s_count for x in range(len(grid))]
  for k in range(k_count - 2, -1, -1):
    w = []
    for x in range(len(grid)):
      row_w = []
      for s in range(s_count):
        cont = lam * cost[k + 1]
        for b in range(s_count):
          cont += trans[k][s][b] * w_next[min(x, idx[k + 1][b])][b]
        row_w.append(min(grid[x], cont))
      w.append(row_w)
    w_next = w
  return lam * cost[0] + sum(init[a] * w_next[idx[0][a]][a] for a in range(s_count))


class QuantEconRecall:
  """The recall problem as a QuantEcon `DiscreteDP` over states (ramp, x, s).

  State (k, x, s) -> index (k * X + x) * S + s, plus a last absorbing state.
  Actions: 0 = stop (reward -grid[x], go to the absorbing state), 1 =
  continue (reward -lam * c_{k+1}, go to (k+1, min(x, idx_{k+1}(b)), b) with
  probability trans_k[s, b]); at the last ramp only stop. State-action pair
  form with a sparse Q, built once; per lam only R changes.
  """

  def __init__(self, init, trans, loss, cost):
    import scipy.sparse as sp
    self.init, self.cost = np.asarray(init), np.asarray(cost)
    k_count, s_count = loss.shape
    self.grid = np.unique(loss)
    x_count = len(self.grid)
    self.idx = np.searchsorted(self.grid, loss)
    self.shape = (k_count, x_count, s_count)
    n = k_count * x_count * s_count + 1
    self.n = n
    # Pairs in state order: each state's stop pair, then its continue pair
    # (not at the last ramp); the absorbing state last (stop = stay).
    k, x, s = (a.ravel() for a in np.meshgrid(np.arange(k_count), np.arange(x_count),
                                              np.arange(s_count), indexing="ij"))
    live = k < k_count - 1
    acts = 1 + live
    pair_state = np.append(np.repeat(np.arange(n - 1), acts), n - 1)
    is_cont = np.zeros(pair_state.size, bool)
    is_cont[np.cumsum(acts)[live] - 1] = True
    self.s_ind, self.a_ind = pair_state, is_cont.astype(np.int64)
    stop_x = np.append(np.repeat(x, acts), 0)
    self.stop_reward = np.where(is_cont, 0.0, -self.grid[stop_x])
    self.stop_reward[-1] = 0.0
    cont_k = k[live]
    self.cont_cost = np.zeros(pair_state.size)
    self.cont_cost[is_cont] = -self.cost[cont_k + 1]
    nnz = np.where(is_cont, s_count, 1)
    indptr = np.zeros(pair_state.size + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    cols = np.full(indptr[-1], n - 1, np.int32)
    vals = np.ones(indptr[-1])
    at = indptr[:-1][is_cont][:, None] + np.arange(s_count)
    b = np.arange(s_count)
    cols[at] = ((cont_k[:, None] + 1) * x_count
                + np.minimum(x[live][:, None], self.idx[cont_k + 1][:, b])) * s_count + b
    vals[at] = trans[cont_k, s[live]]
    self.q = sp.csr_matrix((vals, cols, indptr), shape=(pair_state.size, n))

  def dense(self):
    """The same problem in DiscreteDP's product form: R `[n, 2]`, Q `[n, 2, n]`
    (the continue action of the last ramp and of the stopped state gets reward
    -inf, i.e. is infeasible)."""
    n = self.n
    feasible = np.zeros((n, 2), bool)
    feasible[self.s_ind, self.a_ind] = True
    self.q_dense = np.zeros((n, 2, n))
    self.q_dense[self.s_ind, self.a_ind] = self.q.toarray()
    self.q_dense[~feasible, n - 1] = 1.0  # a valid row for the infeasible pairs
    self.stop_dense, self.cont_dense = np.full((n, 2), -np.inf), np.zeros((n, 2))
    self.stop_dense[self.s_ind, self.a_ind] = self.stop_reward
    self.cont_dense[self.s_ind, self.a_ind] = self.cont_cost
    return self

  def value(self, lam, dense=False):
    from quantecon.markov import DiscreteDP, backward_induction
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # beta = 1: finite horizon only, as here
      if dense:
        r = self.stop_dense + lam * self.cont_dense
        ddp = DiscreteDP(r, self.q_dense, 1.0)
      else:
        ddp = DiscreteDP(self.stop_reward + lam * self.cont_cost, self.q, 1.0,
                         self.s_ind, self.a_ind)
    vs, _ = backward_induction(ddp, self.shape[0])
    k_count, x_count, s_count = self.shape
    start = (0 * x_count + self.idx[0]) * s_count + np.arange(s_count)
    return lam * self.cost[0] - self.init @ vs[0, start]


def numpy_recall(init, trans, loss, cost, lam, rtol=1e-5):
  """Float64 recall value and `[K, S]` thresholds, vectorised over x (numpy).

  `W_k(x, s) = min(grid[x], lam c_{k+1} + sum_b trans_k[s, b] W_{k+1}(min(x, idx_{k+1}(b)), b))`;
  the threshold is the largest grid value of the stop prefix in x (-inf if
  empty), and near-ties (within `rtol`) stop, as in `jexit.solve`. Checks the solver's precision on any
  backend (e.g. TF32 GEMMs on a GPU).
  """
  k_count, s_count = loss.shape
  grid = np.unique(loss)
  idx = np.searchsorted(grid, loss)
  xs = np.arange(len(grid))[:, None]
  w = np.broadcast_to(grid[:, None], (len(grid), s_count))  # W_K
  thresholds = [np.full(s_count, np.inf)]
  for k in range(k_count - 2, -1, -1):
    g = np.take_along_axis(w, np.minimum(xs, idx[k + 1][None, :]), axis=0)
    cont = lam * cost[k + 1] + g @ trans[k].T
    stop = grid[:, None] <= cont + rtol * (1 + np.abs(cont))
    count = np.where(stop.all(axis=0), len(grid), np.argmin(stop, axis=0))
    thresholds.append(np.where(count > 0, grid[np.maximum(count - 1, 0)], -np.inf))
    w = np.where(stop, grid[:, None], cont)
  value = lam * cost[0] + init @ w[idx[0], np.arange(s_count)]
  return value, np.array(thresholds[::-1])


# ---------------------------------------------------------------- workers


def _median_time(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def worker(config, reps, max_bytes, baselines, matmul_size):
  """Measures one configuration in this process; returns a dict."""
  import jax
  import jax.numpy as jnp
  import jexit
  from jexit import solver

  s, k, l, m = config
  model = random_model(0, s, k, m)
  lam = np.geomspace(1e-3, 1.0, l)
  n = matmul_size
  a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
  # Full float32, as the solver's GEMMs (jexit.solver.PRECISION); an
  # accelerator's default precision is timed once too, for reference.
  matmul = jax.jit(functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST))
  matmul(a, a).block_until_ready()
  fast = jax.jit(jnp.dot)
  fast(a, a).block_until_ready()
  t_fast = _median_time(lambda: fast(a, a).block_until_ready(), 5)[0]
  rss_before = rss_bytes()

  def run():
    policy = jexit.solve(model, lam, max_bytes=max_bytes)
    jax.block_until_ready((policy.threshold, policy.value))
    return policy

  t0 = time.perf_counter()
  policy = run()  # compiles
  first = time.perf_counter() - t0
  mm_times, solve_times = [], []
  for _ in range(reps):  # interleaved, so both see the same machine load
    mm_times.append(_median_time(lambda: matmul(a, a).block_until_ready(), 1)[0])
    solve_times.append(_median_time(run, 1)[0])
  t_solve, t_mm = float(np.median(solve_times)), float(np.median(mm_times))
  prep = solver._prepare(model, solver.working_dtype())
  num_x = prep.grid.shape[1]
  flops = m * l * (k - 1) * 2 * num_x * s * s
  per_model, per_policy = solver.solve_bytes(num_x, s, k)
  budget = max_bytes or max(solver.default_max_bytes(jax.devices()[:1]),
                            per_model + per_policy)
  mc, lc = solver._block_shape(m, l, per_model, per_policy, budget, (1, 1))
  out = dict(config=config, x=num_x, policies=m * l, seconds=t_solve,
             seconds_all=solve_times, compile_and_first=first,
             policies_per_s=m * l / t_solve, gflops=flops / t_solve / 1e9,
             matmul_gflops=2 * n ** 3 / t_mm / 1e9, matmul_all=mm_times, matmul_size=n,
             matmul_default_gflops=2 * n ** 3 / t_fast / 1e9,
             block=(mc, lc), blocks=-(-m // mc) * -(-l // lc), block_bytes=budget,
             whole_batch_bytes=m * (per_model + l * per_policy),
             threshold_bytes=int(np.asarray(policy.threshold).nbytes),
             rss_before=rss_before, rss_peak=rss_bytes(),
             device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
  out["ratio"] = out["gflops"] / out["matmul_gflops"]
  stats = jax.devices()[0].memory_stats() if out["backend"] != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak"] = int(stats["peak_bytes_in_use"])

  # Precision against a float64 numpy recursion: model 0 at 5 lam values.
  prep_loss = np.asarray(prep.loss[0], np.float64)  # the float32 losses jexit saw
  one = [np.asarray(getattr(model, f)[0], np.float64) for f in ("init", "trans", "cost")]
  rel, same, total = 0.0, 0, 0
  for i in np.linspace(0, l - 1, 5).astype(int):
    v, th = numpy_recall(one[0], one[1], prep_loss, one[2], lam[i])
    rel = max(rel, abs(float(policy.value[0, i]) - v) / abs(v))
    got = np.asarray(policy.threshold[0, i], np.float64)
    same += int(np.sum(got == th.astype(np.float32).astype(np.float64)))
    total += th.size
  out["ref_max_rel_diff"], out["ref_threshold_agree"] = rel, same / total

  if baselines:
    # The same recall problem, one lam at a time: model 0 of this configuration
    # at a few of its lam values, against jexit's per-policy time in this batch.
    out["jexit_per_policy_s"] = t_solve / (m * l)
    values = np.asarray(policy.value[0], np.float64)
    init, trans, loss, cost = (np.asarray(getattr(model, f)[0], np.float64)
                               for f in ("init", "trans", "loss", "cost"))
    loss = np.asarray(prep.loss[0], np.float64)  # the float32 losses jexit saw
    rel = lambda got, picks: float(np.max(np.abs(np.array(got) - values[picks])
                                          / np.abs(values[picks])))
    inner = (k - 1) * num_x * s * s
    if inner <= LOOP_MAX_INNER:
      picks = np.linspace(0, l - 1, 4).astype(int)
      t0 = time.perf_counter()
      got = [loop_solve(init, trans, loss, cost, lam[i]) for i in picks]
      out["loop_per_policy_s"] = (time.perf_counter() - t0) / len(picks)
      out["loop_max_rel_diff"] = rel(got, picks)
    else:
      out["loop"] = f"not run ({inner / 1e6:.0f} M inner-loop steps per policy)"
    try:
      import quantecon  # noqa: F401  (the `bench` extra)
    except ImportError:
      out["quantecon"] = "not installed (pip install quantecon)"
      return out
    t0 = time.perf_counter()
    qe = QuantEconRecall(init, trans, loss, cost)
    out["quantecon_build_s"] = time.perf_counter() - t0
    out["quantecon_states"], out["quantecon_nnz"] = qe.n, int(qe.q.nnz)
    for form in ("sparse", "dense"):
      if form == "dense":
        if qe.n > DENSE_MAX_STATES:  # Q [n, 2, n] float64 in memory
          break
        qe.dense()
      dense = form == "dense"
      qe.value(lam[0], dense=dense)  # numba compiles
      picks = np.linspace(0, l - 1, 20).astype(int)
      got, t0 = [], time.perf_counter()
      for i in picks:  # at least 3 policies, at most 20 or ~20 s
        got.append(qe.value(lam[i], dense=dense))
        if len(got) >= 3 and time.perf_counter() - t0 > 20:
          break
      key = "quantecon" if form == "sparse" else "quantecon_dense"
      out[f"{key}_per_policy_s"] = (time.perf_counter() - t0) / len(got)
      out[f"{key}_max_rel_diff"] = rel(got, picks[:len(got)])
      out[f"{key}_policies"] = len(got)
  return out


def spawn(config, args, baselines):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(map(str, config)),
         "--reps", str(args.reps), "--matmul-size", str(args.matmul_size)]
  if args.max_bytes:
    cmd += ["--max-bytes", str(args.max_bytes)]
  if baselines:
    cmd += ["--baselines"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"config {config} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def mib(b):
  return f"{b / 2 ** 20:,.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=";".join(",".join(map(str, c)) for c in CONFIGS),
                      help="S,K,L,M;S,K,L,M;...")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--max-bytes", type=int, default=None,
                      help="solve(max_bytes=...); default: the solver's default")
  parser.add_argument("--big", nargs="?", const=",".join(map(str, BIG)), default=None,
                      metavar="S,K,L,M",
                      help=f"also solve L*M policies in one call (default {BIG}: "
                           f"{np.prod(BIG[2:]):,})")
  parser.add_argument("--matmul-size", type=int, default=4096,
                      help="n of the n x n float32 jnp.dot that measures the matmul rate")
  parser.add_argument("--no-baselines", action="store_true")
  parser.add_argument("--json", default=None, help="write all results here")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--baselines", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    config = tuple(int(v) for v in args.worker.split(","))
    print(json.dumps(worker(config, args.reps, args.max_bytes, args.baselines,
                            args.matmul_size)))
    return

  configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
  results = []
  for i, config in enumerate(configs):
    results.append(spawn(config, args, baselines=not args.no_baselines))
    print(f"  done {config}", file=sys.stderr, flush=True)
  big = None
  if args.big:
    big_config = tuple(int(v) for v in args.big.split(","))
    big = spawn(big_config, dataclass_args(args, reps=1), baselines=False)

  r0 = results[0]
  n = args.matmul_size
  print(f"\nbackend: {r0['backend']} ({r0['device']}), {os.cpu_count()} CPU cores; "
        f"median of {args.reps} runs, matmul = {n}^3 float32 jnp.dot at HIGHEST precision "
        f"timed in between (at the default precision: {r0['matmul_default_gflops']:,.0f} "
        f"GFLOP/s); vs float64 = max rel. diff of "
        f"value and share of equal thresholds, model 0 at 5 lam values\n")
  on_device = "device_peak" in r0
  print("| S | K | L | M | X | policies/s | GFLOP/s | matmul GFLOP/s | ratio | "
        "blocks (Mc x Lc) | peak RSS MiB (before solve) | "
        + ("peak device MiB | " if on_device else "") + "vs float64 |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if on_device else ""))
  for r in results + ([big] if big else []):
    s, k, l, m = r["config"]
    print(f"| {s} | {k} | {l} | {m} | {r['x']} | {r['policies_per_s']:,.0f} | "
          f"{r['gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['ratio']:.2f} | "
          f"{r['blocks']} ({r['block'][0]} x {r['block'][1]}) | "
          f"{mib(r['rss_peak'])} ({mib(r['rss_before'])}) | "
          + (f"{mib(r['device_peak'])} | " if on_device else "")
          + f"{r['ref_max_rel_diff']:.1e}, {r['ref_threshold_agree']:.1%} |")
  if big:
    print(f"\n{big['policies']:,} policies {tuple(big['config'])} in one call: "
          f"{big['seconds']:.1f} s, peak RSS {mib(big['rss_peak'])} MiB; the whole batch "
          f"as one block would need ~{mib(big['whole_batch_bytes'])} MiB of working memory.")
  with_qe = [r for r in results if "jexit_per_policy_s" in r]
  if with_qe:
    print("\nper policy, model 0 of each configuration, the same recall problem solved one lam "
          "at a time (jexit: its batch time above / policies):")
    print("| S, K, L, M | QuantEcon states (Q nonzeros) | jexit s/policy | QuantEcon sparse "
          "s/policy (x jexit) | QuantEcon dense s/policy (x jexit) | plain loops s/policy "
          "(x jexit) | max rel. diff of value |")
    print("|---|---|---|---|---|---|---|")
    for r in with_qe:
      mine = r["jexit_per_policy_s"]
      cell = lambda key: (f"{r[key]:.3g} ({r[key] / mine:,.0f}x)" if key in r else "not run")
      diffs = [r[d] for d in ("quantecon_max_rel_diff", "quantecon_dense_max_rel_diff",
                              "loop_max_rel_diff") if d in r]
      states = (f"{r['quantecon_states']:,} ({r['quantecon_nnz']:,})"
                if "quantecon_states" in r else r.get("quantecon", ""))
      print(f"| {', '.join(map(str, r['config']))} | {states} | {mine:.3g} | "
            f"{cell('quantecon_per_policy_s')} | {cell('quantecon_dense_per_policy_s')} | "
            f"{cell('loop_per_policy_s')} | {max(diffs):.1e} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results=results, big=big), f, indent=1)


def dataclass_args(args, **changes):
  new = argparse.Namespace(**vars(args))
  for key, value in changes.items():
    setattr(new, key, value)
  return new


if __name__ == "__main__":
  main()
