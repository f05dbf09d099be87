"""Wall-clock benchmark: EarlyExitRunner under an exit policy vs the plain backbone.

Two kinds of networks (`--nets`, default all):

  - `digits`: the digits early-exit VGG-11 (width/4, 2x2 heads; trained as
    `experiments/make_traces.py --head-pool 2` trains it, or loaded with
    `--weights`). Policies are fitted and solved on the first half of its
    trace rows, the lam with the most speedup at agreement loss <= `--max-loss`
    on those rows is exported, and everything is timed on the other half.
  - `vgg11`, `vgg16`: deployment-sized early-exit VGGs at torchvision's full
    width, 1,000 classes, ramps after pooling stages 2, 3 and 5, on
    `--size` x `--size` inputs (digits images resized, 3 channels), with
    RANDOM weights (seeded; wall time does not depend on them). A trace of
    `--inputs` inputs is recorded (`jexit.record`), a proxy-loss policy is
    fitted and solved on it (`jexit.fit(loss="proxy")`), and the lam whose
    policy stops closest to `--early` of the inputs before the last ramp is
    exported: a table with something to skip. Timed on those inputs.

  backbone: every segment, then the final head (no ramp heads).
  runner:   `EarlyExitRunner(segments, heads, table)` (ramp heads, decisions on
            the device, compaction after every ramp).

At batch sizes 1, 32 and 256 it prints the mean wall-clock ms per input of
each (total time / inputs: the throughput), both measured on the same batches
in alternating order, the measured speedup (ratio of the means; of the medians
too, which at batch 1 is the typical input's), and the speedup the FLOPs
predict for the same decisions. For the
digits network also the batching modes ("compact", "bucket", "mask") and, with
`--compile`, `torch.compile`d segments with bucketed shapes.

    python benchmarks/bench_runtime.py --threads 1 [--nets digits,vgg11,vgg16] \\
        [--weights W.pt] [--device cuda] [--compile]
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jexit  # noqa: E402
from jexit import vgg, vgg_traces  # noqa: E402
from jexit.evaluation import evaluate  # noqa: E402
from jexit.export import export_policy  # noqa: E402
from jexit.fit import cross_fitted_class_signal  # noqa: E402
from jexit.record import flops_of, record  # noqa: E402
from jexit.runtime import ExitTable  # noqa: E402
from jexit.runtime_torch import EarlyExitRunner  # noqa: E402

BATCH_SIZES = (1, 32, 256)
NETS = ("digits", "vgg11", "vgg16")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nets", default=",".join(NETS), help=f"comma list of {NETS}")
  p.add_argument("--weights", help="digits: EarlyExitVGG state dict to load instead of training")
  p.add_argument("--save-weights", help="digits: write the trained state dict here")
  p.add_argument("--epochs", type=int, default=vgg_traces.TraceConfig.epochs)
  p.add_argument("--head-pool", type=int, default=2,
                 help="digits: ramp heads' pool size (2, the first suite's)")
  p.add_argument("--max-loss", type=float, default=0.01,
                 help="digits: agreement loss budget used to choose lam on the fit rows")
  p.add_argument("--lams", type=int, default=400, help="lam grid size")
  p.add_argument("--signal", choices=("1-conf", "class"), default="1-conf",
                 help="digits: exit signal of the policy")
  p.add_argument("--size", type=int, default=64, help="vgg11/vgg16: input side in pixels")
  p.add_argument("--inputs", type=int, default=256,
                 help="vgg11/vgg16: inputs recorded and timed (>= 256)")
  p.add_argument("--early", type=float, default=0.5,
                 help="vgg11/vgg16: share of inputs the policy stops before the last ramp")
  p.add_argument("--device", default="cpu")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  p.add_argument("--singles", type=int, default=None,
                 help="inputs timed one by one at batch size 1, spread over all of them "
                      "(default 300 digits, 48 big)")
  p.add_argument("--batches", type=int, default=None,
                 help="timed batches at 32 and 256 (default 20 digits; big nets: 3 at "
                      "256, twice that at 32)")
  p.add_argument("--compile", action="store_true",
                 help="digits: also time torch.compile'd segments with bucketed shapes")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine(device) -> str:
  return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))


def plain_backbone(segments, heads):
  """The network without its early exits: all segments, then the final head."""
  @torch.inference_mode()
  def run(x):
    for segment in segments:
      x = segment(x)
    return heads[-1](x).argmax(-1)
  return run


def latencies(fns, images, batch_size, count, sync):
  """Median and mean seconds per input of each of `fns` over `count` batches:
  consecutive ones (cycling through `images`), or at batch size 1 `count`
  inputs evenly spread over `images` (so they exit as all of them do).

  The functions are timed on the same batch one after the other, in an order
  that alternates, so that drift and other processes hit them alike.
  """
  n = len(images)
  if batch_size == 1:
    starts = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int)).tolist()
  else:
    starts = list(range(0, n - batch_size + 1, batch_size))
    starts = (starts * (-(-count // len(starts))))[:count]
  times = np.zeros((len(starts), len(fns)))
  for i, s in enumerate(starts):
    x = images[s:s + batch_size]
    order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
    for j in order:
      sync()
      t0 = time.perf_counter()
      fns[j](x)
      sync()
      times[i, j] = (time.perf_counter() - t0) / batch_size
  return np.median(times, axis=0), times.mean(axis=0)


TABLE_HEAD = ("| batch | backbone ms/input (mean) | runner ms/input (mean) | measured speedup "
              "(ratio of means) | measured speedup (ratio of medians) | FLOPs speedup |")


def table_row(b, median, mean, flops_speedup, digits):
  return (f"| {b} | {1e3 * mean[0]:.{digits}f} | {1e3 * mean[1]:.{digits}f} | "
          f"**{mean[0] / mean[1]:.2f}x** | {median[0] / median[1]:.2f}x | {flops_speedup:.2f}x |")


def policy_flops(stop_ramp, traces) -> float:
  """Mean FLOPs per input of running every ramp up to `stop_ramp [N]`."""
  return float(np.cumsum(traces.cost)[stop_ramp].mean())


def warm(fns, x, sync, sizes=BATCH_SIZES):
  """Runs every function at every batch size (allocator, oneDNN/cuDNN kernel
  choice) before timing."""
  for b in sizes:
    for fn in fns:
      for _ in range(2 if b < 256 else 1):
        fn(x[:b])
  sync()


# ------------------------------------------------------------------ digits

def choose_policy(traces, fit_rows, max_loss, num_lams, signal="1-conf", block=1):
  """Most-speedup lam whose agreement loss on the fit rows is <= max_loss.

  With `signal="class"` the fit rows are scored, as `jexit.protocol` does, on
  their cross-fitted class scores (blocks of `block` related rows kept whole).
  """
  options = {"class_block": block} if signal == "class" else {}
  model, binning = jexit.fit(traces, rows=fit_rows, signal=signal, **options)
  fit_traces = traces.take(fit_rows)
  if signal == "class":
    fit_traces = fit_traces._replace(signal=cross_fitted_class_signal(fit_traces, block=block))
    binning_fit = binning._replace(signal="signal", calibration=None)
  else:
    binning_fit = binning
  scale = 1.0 / traces.cost.sum()
  lams = np.concatenate([[0.0], scale * np.logspace(-4, 1, num_lams - 1)])
  policy = jexit.solve(model, lams)
  ev = evaluate(policy, fit_traces, binning_fit)
  ok = 1.0 - ev.agreement <= max_loss
  if not ok.any():
    raise RuntimeError(f"no lam meets agreement loss <= {max_loss} on the fit rows")
  index = int(np.flatnonzero(ok)[np.argmax(ev.speedup[ok])])
  return model, binning, policy, index, ev


def bench_digits(args, device, sync):
  singles, batches = args.singles or 300, args.batches or 20
  t0 = time.perf_counter()
  config = vgg_traces.TraceConfig(epochs=0 if args.weights else args.epochs, seed=args.seed,
                           head_pool=args.head_pool)
  run = vgg_traces.make_traces(config, weights=args.weights, device=device)
  if args.save_weights:
    torch.save(run.model.state_dict(), args.save_weights)
  data = vgg_traces.load_digits_images(config.size)
  held = np.unique(run.trace_source)
  images, labels, source = vgg_traces.trace_inputs(data, held, config.copies, config.seed)
  if not (np.array_equal(source, run.trace_source)
          and np.array_equal(labels.numpy(), run.traces.label)):
    raise RuntimeError("rebuilt trace inputs do not match the trace rows")
  traces = run.traces
  n = traces.num_inputs
  embedded = jexit.load_demo_traces()
  same = (embedded.conf.shape == traces.conf.shape
          and np.array_equal(embedded.conf, traces.conf)
          and np.array_equal(embedded.pred, traces.pred))
  # Contiguous halves at a group boundary: augmented copies of one image stay together.
  half = (n // 2) // config.copies * config.copies
  fit_rows, test_rows = np.arange(half), np.arange(half, n)
  model, binning, policy, index, fit_ev = choose_policy(traces, fit_rows, args.max_loss,
                                                        args.lams, args.signal, config.copies)
  test = traces.take(test_rows)
  test_ev = evaluate(policy, test, binning, return_per_input=True)
  path = os.path.join(tempfile.mkdtemp(), "policy.npz")
  export_policy(path, policy, binning, model, index, traces=traces.take(fit_rows))
  table = ExitTable.load(path, out_of_range="clip")
  setup_s = time.perf_counter() - t0

  net = run.model.to(device).eval()
  segments, heads = list(net.segments), list(net.heads)
  runner = EarlyExitRunner(segments, heads, table)
  backbone = plain_backbone(segments, heads)
  x_test = images[torch.as_tensor(test_rows)].to(device)

  out = runner(x_test)
  stop_np, output_np, _ = table.run(test.conf, test.pred)
  stop_t = out.stop_ramp.cpu().numpy()
  mismatch = int(np.sum((stop_t != stop_np) | (out.output_ramp.cpu().numpy() != output_np)))
  measured_agree = float(np.mean(out.pred.cpu().numpy() == test.pred[:, -1]))
  mean_flops = float(test_ev.mean_cost[index])
  one = torch.zeros(1, *images.shape[1:], device=device)
  backbone_flops = flops_of(lambda: backbone(one))

  warm((backbone, runner), x_test, sync)
  rows, load = [], os.getloadavg()
  for b in BATCH_SIZES:
    median, mean = latencies((backbone, runner), x_test, b, singles if b == 1 else batches, sync)
    seg_ms = vgg.segment_latency(net, tuple(images.shape[1:]), device, batch_size=b,
                                 warmup=3, repeats=20)
    lat_ev = evaluate(policy, test._replace(cost=seg_ms, head_cost=None), binning)
    rows.append((b, median, mean, float(lat_ev.speedup[index]), seg_ms / b))

  lam = float(np.asarray(policy.lam)[index])
  stop_hist = np.bincount(stop_t, minlength=traces.num_ramps) / len(stop_t)
  print(f"## digits VGG-11 (width/4, trained), {traces.num_ramps} ramps")
  print()
  print(f"- model: {config.arch} width/{config.width_div}, ramps after stages "
        f"{vgg.DEFAULT_RAMP_STAGES[config.ramps]}, head pool {config.head_pool}, "
        + (f"weights {args.weights}" if args.weights else f"trained {config.epochs} epochs")
        + f"; final-ramp accuracy {run.accuracy[-1]:.3f} on the trace rows")
  print(f"- trace: {n} rows (held-out digits x {config.copies} augmentations); policy fit "
        f"on rows [0, {half}), everything below measured on the other {len(test_rows)}; "
        f"identical to the embedded jexit/data/digits_vgg11.npz: {'yes' if same else 'no'}")
  print(f"- policy: recall on {args.signal}, lam = {lam:.4g} (index {index} of {args.lams}), "
        f"chosen on the fit rows for the most speedup at agreement loss <= {args.max_loss:g} "
        f"(fit: {1 - fit_ev.agreement[index]:.4f})")
  print(f"- test rows: agreement with the backbone {test_ev.agreement[index]:.4f} "
        f"(evaluate) / {measured_agree:.4f} (runner); stop histogram "
        f"{np.round(stop_hist, 3).tolist()}")
  print(f"- runner decisions vs the numpy runtime on the trace: {mismatch} of "
        f"{len(test_rows)} inputs differ")
  print(f"- FLOPs per input: backbone {backbone_flops / 1e6:.2f} M, policy mean "
        f"{mean_flops / 1e6:.2f} M: predicted speedup {backbone_flops / mean_flops:.2f}x")
  print(f"- setup (train/load, trace, fit, solve, export): {setup_s:.0f} s; load average "
        f"during timing {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
  print()
  print(TABLE_HEAD + " latency-cost speedup |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for b, median, mean, lat_speedup, _ in rows:
    print(table_row(b, median, mean, backbone_flops / mean_flops, 3) + f" {lat_speedup:.2f}x |")
  print()
  share = traces.cost / traces.cost.sum()
  print(f"Per-segment (segment + head) ms per input; FLOPs share {np.round(share, 3).tolist()}:")
  for b, _, _, _, seg in rows:
    print(f"- batch {b}: {np.round(seg, 4).tolist()} ms, share "
          f"{np.round(seg / seg.sum(), 3).tolist()}")
  print()
  bench_batching(segments, heads, table, backbone, x_test, batches, singles, sync, args)


def bench_batching(segments, heads, table, backbone, x, batches, singles, sync, args):
  """The batching modes (and the batch-1 paths) on the same batches."""
  modes = {m: EarlyExitRunner(segments, heads, table, batching=m)
           for m in ("compact", "bucket", "mask")}
  print("### Batching modes (digits network, eager)")
  print()
  print("| batch | backbone | compact | bucket (powers of 2) | mask | ms per input, means |")
  print("|---:|---:|---:|---:|---:|---|")
  fns = [backbone] + list(modes.values())
  warm(fns, x, sync)
  for b in BATCH_SIZES:
    _, mean = latencies(fns, x, b, singles if b == 1 else batches, sync)
    note = ("compact = the plain-Python batch-1 path; bucket = the tensor path at B = 1"
            if b == 1 else "")
    print(f"| {b} | " + " | ".join(f"{1e3 * m:.3f}" for m in mean) + f" | {note} |")
  print()
  if not args.compile:
    return
  # torch.compile wants static shapes: compile each segment once per shape it
  # meets (dynamic=False); "bucket" limits those to a few sizes.
  sizes = (64, 128, 256)
  # The segments share one forward (nn.Sequential's): allow a compile per shape each.
  torch._dynamo.config.recompile_limit = 64  # pylint: disable=protected-access
  compiled = [torch.compile(s, dynamic=False) for s in segments]
  runner = EarlyExitRunner(compiled, heads, table, batching="bucket", bucket_sizes=sizes)
  cbackbone = plain_backbone(compiled, heads)
  t0 = time.perf_counter()
  with torch.inference_mode():
    for b in sizes:
      h = x[:b]
      for s in compiled:
        h = s(h)
  compile_s = time.perf_counter() - t0
  eager = EarlyExitRunner(segments, heads, table)
  fns = [backbone, eager, cbackbone, runner]
  for fn in fns:
    fn(x[:256])
  sync()
  _, mean = latencies(fns, x, 256, batches, sync)
  print(f"### torch.compile (segments, dynamic=False, buckets {sizes}), batch 256")
  print()
  print(f"Compiling {len(sizes)} shapes x {len(segments)} segments took {compile_s:.0f} s.")
  print()
  print("| backbone eager | runner eager (compact) | backbone compiled | runner compiled "
        "(bucket) | ms per input, means |")
  print("|---:|---:|---:|---:|---|")
  print("| " + " | ".join(f"{1e3 * m:.3f}" for m in mean) + " | |")
  print()


# ------------------------------------------------------- deployment-sized

@torch.no_grad()
def spread_heads(model, images, median_conf=(0.5, 0.5, 0.8)):
  """Rescales each head's last linear layer so that its median max-softmax on
  `images` is about `median_conf[k]` (the final head the most confident, as
  in a trained network): random heads otherwise give a near-uniform
  softmax over 1,000 classes at deep ramps and a peaked one at shallow ramps,
  and no policy would stop some inputs early and run others on."""
  h = images
  for segment, head, target in zip(model.segments, model.heads, median_conf):
    h = segment(h)
    head[-1].bias.zero_()  # else a random bias outweighs the features of deep ramps
    z = head(h).double()
    lo, hi = -10.0, 30.0  # log2 of the scale
    for _ in range(40):
      mid = (lo + hi) / 2
      conf = (z * 2.0 ** mid).softmax(-1).max(-1).values.median()
      lo, hi = (mid, hi) if conf < target else (lo, mid)
    head[-1].weight.mul_(2.0 ** lo)


def table_for_share(traces, early, num_lams):
  """The `ExitTable` of a proxy-loss recall policy whose share of inputs
  stopping before the last ramp is closest to `early`."""
  model, binning = jexit.fit(traces, bins="quantile", num_bins=16, loss="proxy")
  lams = np.concatenate([[0.0], np.logspace(-4, 2, num_lams - 1) / traces.cost.sum()])
  policy = jexit.solve(model, lams)
  ev = evaluate(policy, traces, binning)
  share = 1.0 - ev.stop_hist[:, -1]
  index = int(np.argmin(np.abs(share - early)))
  path = os.path.join(tempfile.mkdtemp(), "policy.npz")
  export_policy(path, policy, binning, model, index, traces=traces)
  return ExitTable.load(path, out_of_range="clip")


def bench_big(arch, args, device, sync):
  singles, batches = args.singles or 48, args.batches or 3
  t0 = time.perf_counter()
  torch.manual_seed(args.seed)
  net = vgg.build_model(arch, 3, width_div=1, num_classes=1000).to(device).eval()
  images = vgg_traces.load_digits_images(args.size).images[:args.inputs].expand(-1, 3, -1, -1)
  images = images.contiguous().to(device)
  spread_heads(net, images[:32])
  traces = record(net.segments, net.heads, images, batch_size=32, device=device,
                  progress=False)
  table = table_for_share(traces, args.early, args.lams)
  segments, heads = list(net.segments), list(net.heads)
  runner = EarlyExitRunner(segments, heads, table)
  backbone = plain_backbone(segments, heads)
  out = runner(images)
  stop = out.stop_ramp.cpu().numpy()
  want = table.run(traces.conf, traces.pred)
  mismatch = int(np.sum((stop != want[0]) | (out.output_ramp.cpu().numpy() != want[1])))
  backbone_flops = flops_of(lambda: backbone(images[:1]))
  predicted = backbone_flops / policy_flops(stop, traces)
  setup_s = time.perf_counter() - t0

  warm((backbone, runner), images, sync, sizes=(1, 32))
  backbone(images)  # the runner ran the whole batch above
  rows, load = [], os.getloadavg()
  for b in BATCH_SIZES:
    median, mean = latencies((backbone, runner), images, b,
                             singles if b == 1 else batches * (2 if b == 32 else 1), sync)
    rows.append((b, median, mean))
  hist = np.bincount(stop, minlength=3) / len(stop)
  print(f"## {arch}, full width, {args.size}x{args.size} inputs, RANDOM weights (timing only)")
  print()
  print(f"- model: torchvision's {arch}_bn layers at full width (64..512 channels), 1,000 "
        f"classes, ramps after pooling stages {vgg.DEFAULT_RAMP_STAGES[3]} (4x4-pooled "
        f"linear heads; the final head pools to 1x1); seeded random weights, heads "
        f"without bias, rescaled to median confidences 0.5, 0.5 and 0.8 on the first 32 "
        f"inputs")
  print(f"- policy: proxy loss (1 - conf), 16 quantile bins, recall, the lam of {args.lams} "
        f"whose policy stops closest to {args.early:.0%} of the {len(stop)} recorded inputs "
        f"before the last ramp; stop histogram {np.round(hist, 3).tolist()}; runner "
        f"decisions vs the numpy runtime on the recorded trace: {mismatch} of {len(stop)} "
        f"differ")
  print(f"- FLOPs per input: backbone {backbone_flops / 1e9:.3f} G, ramps "
        f"{np.round(traces.cost / 1e9, 3).tolist()} G (heads "
        f"{np.round(traces.head_cost / 1e6, 2).tolist()} M), runner mean "
        f"{policy_flops(stop, traces) / 1e9:.3f} G: predicted speedup {predicted:.2f}x")
  print(f"- setup (build, record {len(stop)} inputs, fit, solve, export): {setup_s:.0f} s; "
        f"load average during timing {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
  print()
  print(TABLE_HEAD)
  print("|---:|---:|---:|---:|---:|---:|")
  for b, median, mean in rows:
    print(table_row(b, median, mean, predicted, 2))
  print()


def main(argv=None):
  args = parse_args(argv)
  nets = [n for n in args.nets.split(",") if n]
  unknown = sorted(set(nets) - set(NETS))
  if unknown:
    raise SystemExit(f"--nets: expected names from {NETS}, got {unknown}")
  if args.inputs < 256:
    raise SystemExit(f"--inputs: expected >= 256 (batch 256 is timed), got {args.inputs}")
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  start = time.perf_counter()
  print(f"# EarlyExitRunner vs the plain backbone ({time.strftime('%Y-%m-%d')})")
  print()
  print(f"- machine: {machine(device)}")
  print()
  for net in nets:
    if net == "digits":
      bench_digits(args, device, sync)
    else:
      bench_big(net, args, device, sync)
  print(f"(total {time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
