"""Throughput of `jexit.record.record` and the overhead of latency profiling.

For each network it records a trace of `--inputs` inputs three ways on the
same data and prints the wall time:

  - `cost="flops"`: the batched passes plus one FlopCounterMode pass;
  - `cost="latency"`: the batched passes plus the per-segment and per-head
    timing (`--warmup` untimed passes, `--repeats` timed ones, median);
  - the parts alone: `count_flops` and `measure_latency`.

Networks: the digits early-exit VGG-11 (width/4, 32x32) and VGG-11 at full
width on `--size` x `--size` inputs (1,000 classes), both with random weights
(recording time does not depend on them); the inputs are digits images.

    python benchmarks/bench_record.py --threads 1
"""

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jexit import vgg, vgg_traces  # noqa: E402
from jexit.record import count_flops, measure_latency, record  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--device", default="cpu")
  p.add_argument("--size", type=int, default=64, help="full-width VGG-11's input side")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--repeats", type=int, default=50)
  return p.parse_args(argv)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv=None):
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  torch.manual_seed(0)
  digits = vgg_traces.load_digits_images(32).images
  nets = [("digits VGG-11 width/4, 32x32", vgg.build_model("vgg11", 3, width_div=4),
           digits[:1536]),
          (f"VGG-11 full width, {args.size}x{args.size}, 1,000 classes",
           vgg.build_model("vgg11", 3, width_div=1, num_classes=1000),
           vgg_traces.load_digits_images(args.size).images[:256].expand(-1, 3, -1, -1).contiguous())]
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
              if line.startswith("model name")), platform.machine())
  print(f"# jexit.record throughput ({time.strftime('%Y-%m-%d')})")
  print()
  print(f"- machine: {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}; load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"- record batch size {args.batch_size}; latency profiling at batch 1 with "
        f"{args.warmup} warm-up and {args.repeats} timed passes (median)")
  print()
  print("| network | inputs | record, cost=flops (s) | inputs/s | record, cost=latency (s) | "
        "count_flops alone (s) | measure_latency alone (s) | latency overhead |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, model, images in nets:
    model = model.to(device).eval()
    images = images.to(device)
    common = dict(batch_size=args.batch_size, device=device, progress=False)
    record(model.segments, model.heads, images[:args.batch_size], **common)  # warm up
    sync()
    t_flops, _ = timed(lambda: record(model.segments, model.heads, images, **common))
    t_lat, _ = timed(lambda: record(model.segments, model.heads, images, cost="latency",
                                    warmup=args.warmup, repeats=args.repeats, **common))
    with torch.no_grad():
      t_count, _ = timed(lambda: count_flops(model.segments, model.heads, images[:1]))
      t_measure, _ = timed(lambda: measure_latency(model.segments, model.heads, images[:1],
                                                   warmup=args.warmup, repeats=args.repeats))
    n = len(images)
    print(f"| {name} | {n} | {t_flops:.2f} | {n / t_flops:.0f} | {t_lat:.2f} | {t_count:.2f} "
          f"| {t_measure:.2f} | +{100 * (t_lat - t_flops) / t_flops:.0f}% |")
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
