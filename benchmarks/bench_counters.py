"""Wall-clock cost of deployment counters: runtimes with counters off vs on.

Two runtimes, each timed off / on / on with a 5% audit on the same batches in
alternating order (medians of per-call times; the overhead as the ratio of
medians minus 1 and, in parentheses, the median of the paired differences on
the same batch over the median time off, which cancels slow load changes):

  - numpy `ExitTable.run` on the embedded digits trace (2,876 rows; policy:
    `jexit.fit` defaults, the lam whose policy stops closest to half of the
    rows before the last ramp). Its time is the decision rule alone (a few
    numpy calls per ramp), so this is the worst case for the relative cost.
  - torch `EarlyExitRunner` (CPU) on the digits-sized early-exit VGG-11
    (width/4, 3 ramps, 32x32 inputs; seeded RANDOM weights with heads rescaled
    as benchmarks/bench_runtime.py does, timing only), policy as above on its
    recorded trace. Batch sizes 1, 32 and 256.

    python benchmarks/bench_counters.py --threads 1 [--repeats 200]
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jexit  # noqa: E402
from bench_runtime import machine, spread_heads, table_for_share  # noqa: E402
from jexit import vgg, vgg_traces  # noqa: E402
from jexit.record import record  # noqa: E402
from jexit.runtime import ExitTable  # noqa: E402
from jexit.runtime_torch import EarlyExitRunner  # noqa: E402

MODES = (("off", {}), ("on", {"counters": True}),
         ("on + audit 5%", {"counters": True, "audit": 0.05, "seed": 0}))


def timed(fns, batches, repeats):
  """`([len(fns)] median seconds per call, [len(fns) - 1] median of the paired
  differences fns[j] - fns[0] on the same batch)` over `repeats` passes of
  `batches`, the functions alternating order on each batch."""
  times = [[] for _ in fns]
  i = 0
  for _ in range(repeats):
    for batch in batches:
      order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
      i += 1
      for j in order:
        t0 = time.perf_counter()
        fns[j](*batch)
        times[j].append(time.perf_counter() - t0)
  t = np.array(times)
  return np.median(t, axis=1), np.median(t[1:] - t[:1], axis=1)


def table_row(name, b, timing):
  med, diff = timing
  cells = " | ".join(f"{1e3 * m:.3f}" for m in med)
  over = " | ".join(f"{100 * (m / med[0] - 1):+.1f}% ({100 * d / med[0]:+.1f}%)"
                    for m, d in zip(med[1:], diff))
  return f"| {name} | {b} | {cells} | {over} |"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--repeats", type=int, default=30, help="passes over the batches")
  p.add_argument("--inputs", type=int, default=1024, help="torch: images recorded and served")
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  t0 = time.perf_counter()
  print(f"machine: {machine(torch.device('cpu'))}; load average {os.getloadavg()[0]:.1f}")
  print()
  print("| runtime | batch | off ms/call | on ms/call | on + audit ms/call | on overhead "
        "(paired) | on + audit overhead (paired) |")
  print("|---|---:|---:|---:|---:|---:|---:|")

  # numpy: the decision rule alone
  traces = jexit.load_demo_traces()
  base = table_for_share(traces, 0.5, 200)
  tables = [ExitTable.load(base.path, out_of_range="clip", **kw) for _, kw in MODES]
  for b in (32, 256, 2876):
    starts = range(0, traces.num_inputs - b + 1, b)
    batches = [(traces.conf[s:s + b], traces.pred[s:s + b]) for s in starts]
    med = timed([t.run for t in tables], batches, max(3, args.repeats * b // 256))
    print(table_row("numpy ExitTable.run", b, med))

  # torch: the runner on a small VGG
  torch.manual_seed(0)
  net = vgg.build_model("vgg11", 3, width_div=4, num_classes=10).eval()
  images = vgg_traces.load_digits_images(32).images[:args.inputs].contiguous()
  spread_heads(net, images[:64], median_conf=(0.6, 0.7, 0.9))
  rec = record(net.segments, net.heads, images, batch_size=256, progress=False)
  table = table_for_share(rec, 0.5, 200)
  runners = [EarlyExitRunner(list(net.segments), list(net.heads), table, **kw)
             for _, kw in MODES]
  out = runners[0](images)
  share = float((out.stop_ramp < 2).float().mean())
  for r in runners:  # warm up
    for b in (1, 32, 256):
      r(images[:b])
  for b in (1, 32, 256):
    if b == 1:
      batches = [(images[i:i + 1],) for i in range(0, len(images), 8)]
      repeats = max(1, args.repeats // 10)
    else:
      batches = [(images[s:s + b],) for s in range(0, len(images) - b + 1, b)]
      repeats = max(2, args.repeats * b // 1024)
    med = timed(runners, batches, repeats)
    print(table_row("torch EarlyExitRunner (CPU)", b, med))
  c = runners[2].counters
  print()
  print(f"torch policy: {share:.0%} of {len(images)} inputs stop before the last ramp; "
        f"audited {c.audited} of {c.num_inputs} inputs served with audit; setup and timing "
        f"{time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
