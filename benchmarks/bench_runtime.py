"""Wall-clock benchmark: EarlyExitRunner with a solved policy vs the backbone.

Trains the digits early-exit VGG-11 (experiments/ee_vgg.py defaults, or loads
a saved state dict), fits and solves exit policies on the first half of its
trace rows, picks the lam with the most speedup whose agreement loss on those
rows is within `--max-loss`, exports it, and times on the other half:

  - backbone: every segment, then the final head (no intermediate heads);
  - runner:   `EarlyExitRunner(segments, heads, table)`, which runs ramp heads
              and drops the inputs that exit after every ramp.

At batch sizes 1, 32 and 256 it prints the median wall-clock latency per input
of each, the measured speedup, and the FLOPs speedup that `jexit.evaluation`
predicts for the same policy on the same rows.

    python benchmarks/bench_runtime.py [--weights W.pt] [--device cuda] [--signal class]
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jexit  # noqa: E402
from experiments import ee_vgg  # noqa: E402
from jexit.evaluation import evaluate  # noqa: E402
from jexit.export import export_policy  # noqa: E402
from jexit.fit import cross_fitted_class_signal  # noqa: E402
from jexit.runtime import ExitTable  # noqa: E402
from jexit.runtime_torch import EarlyExitRunner  # noqa: E402

BATCH_SIZES = (1, 32, 256)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--weights", help="EarlyExitVGG state dict to load instead of training")
  p.add_argument("--save-weights", help="write the trained state dict here")
  p.add_argument("--epochs", type=int, default=ee_vgg.TraceConfig.epochs)
  p.add_argument("--head-pool", type=int, default=2,
                 help="ramp heads' pool size (RUNTIME.md's network: 2, the first suite's; "
                      "make_traces.py now defaults to 4)")
  p.add_argument("--max-loss", type=float, default=0.01,
                 help="agreement loss budget used to choose lam on the fit rows")
  p.add_argument("--lams", type=int, default=400, help="lam grid size")
  p.add_argument("--device", default="cpu")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  p.add_argument("--single-inputs", type=int, default=300,
                 help="inputs timed one by one at batch size 1")
  p.add_argument("--min-batches", type=int, default=20,
                 help="timed batches at least (the test rows are cycled)")
  p.add_argument("--latency-repeats", type=int, default=20,
                 help="repeats of the per-segment latency measurement")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--signal", choices=("1-conf", "class"), default="1-conf",
                 help="exit signal of the policy (class: the per-class calibration of "
                      "experiments/CLASS.md, computed by the runner from each ramp's output)")
  return p.parse_args(argv)


def plain_backbone(segments, heads):
  """The network without its early exits: all segments, then the final head."""
  @torch.inference_mode()
  def run(x):
    for segment in segments:
      x = segment(x)
    return heads[-1](x).argmax(-1)
  return run


def flops_of(fn, x) -> int:
  with FlopCounterMode(display=False) as counter:
    fn(x)
  return int(counter.get_total_flops())


def build(args, device):
  """The trained model, its trace, and the images of every trace row."""
  config = ee_vgg.TraceConfig(epochs=0 if args.weights else args.epochs, seed=args.seed,
                              head_pool=args.head_pool)
  run = ee_vgg.make_traces(config, weights=args.weights, device=device)
  if args.save_weights:
    torch.save(run.model.state_dict(), args.save_weights)
  # make_traces does not return the images; rebuild them (seeded, same order).
  data = ee_vgg.load_digits_images(config.size)
  held = np.unique(run.trace_source)
  images, labels, source = ee_vgg.trace_inputs(data, held, config.copies, config.seed)
  if not (np.array_equal(source, run.trace_source)
          and np.array_equal(labels.numpy(), run.traces.label)):
    raise RuntimeError("rebuilt trace inputs do not match the trace rows")
  return run, images, config


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


def latencies(fns, images, batch_size, min_batches, single_inputs, sync):
  """Median and mean seconds per input of each of `fns` over consecutive batches.

  The functions are timed on the same batch one after the other, in an order
  that alternates, so that drift and other processes hit them alike.
  """
  n = len(images)
  if batch_size == 1:
    starts = list(range(min(single_inputs, n)))
  else:
    per_pass = list(range(0, n - batch_size + 1, batch_size))
    starts = (per_pass * (-(-min_batches // len(per_pass))))[:max(min_batches, len(per_pass))]
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


def main(argv=None):
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  torch.manual_seed(args.seed)

  t0 = time.perf_counter()
  run, images, config = build(args, device)
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

  # Decisions of the runner (compacted batches) vs the numpy runtime on the trace.
  out = runner(x_test)
  stop_np, output_np, pred_np = table.run(test.conf, test.pred)
  stop_t = out.stop_ramp.cpu().numpy()
  mismatch = int(np.sum((stop_t != stop_np) | (out.output_ramp.cpu().numpy() != output_np)))
  measured_agree = float(np.mean(out.pred.cpu().numpy() == test.pred[:, -1]))

  # FLOPs: evaluate's cost counts each segment with its ramp head.
  mean_flops = float(test_ev.mean_cost[index])
  cpu_net = run.model.cpu()
  one = torch.zeros(1, *images.shape[1:])
  backbone_flops = flops_of(plain_backbone(list(cpu_net.segments), list(cpu_net.heads)), one)
  net = run.model.to(device).eval()

  # Warm up both paths (allocator, oneDNN/cuDNN kernel choice) at every batch size.
  for b in BATCH_SIZES:
    for _ in range(3):
      runner(x_test[:b])
      backbone(x_test[:b])
  rows = []
  load = os.getloadavg()
  for b in BATCH_SIZES:
    median, mean = latencies((backbone, runner), x_test, b, args.min_batches,
                             args.single_inputs, sync)
    # What evaluate predicts when each segment's cost is its measured latency
    # at this batch size (FLOPs miss pooling, BN, ReLU and memory traffic).
    seg_ms = ee_vgg.segment_latency(net, tuple(images.shape[1:]), device, batch_size=b,
                                    warmup=3, repeats=args.latency_repeats)
    lat_ev = evaluate(policy, test._replace(cost=seg_ms), binning)
    rows.append((b, median, mean, float(lat_ev.speedup[index]), seg_ms / b))

  lam = float(np.asarray(policy.lam)[index])
  stop_hist = np.bincount(stop_t, minlength=traces.num_ramps) / len(stop_t)
  print(f"# EarlyExitRunner vs plain backbone: digits VGG-11, {traces.num_ramps} ramps")
  print()
  print(f"- machine: {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
  print(f"- model: {config.arch} width/{config.width_div}, ramps after stages "
        f"{ee_vgg.DEFAULT_RAMP_STAGES[config.ramps]}, "
        + (f"weights {args.weights}" if args.weights else f"trained {config.epochs} epochs")
        + f"; final-ramp accuracy {run.accuracy[-1]:.3f} on the trace rows")
  print(f"- trace: {n} rows (held-out digits x {config.copies} augmentations); policy fit "
        f"on rows [0, {half}), everything below measured on the other {len(test_rows)}; "
        f"identical to the embedded jexit/data/digits_vgg11.npz: {'yes' if same else 'no'}")
  print(f"- policy: recall on {args.signal}, lam = {lam:.4g} (index {index} of {args.lams}), chosen on the "
        f"fit rows for the most speedup at agreement loss <= {args.max_loss:g} "
        f"(fit: {1 - fit_ev.agreement[index]:.4f})")
  print(f"- test rows: agreement with the backbone {test_ev.agreement[index]:.4f} "
        f"(evaluate) / {measured_agree:.4f} (runner), accuracy "
        f"{test_ev.accuracy[index]:.4f} vs backbone {run.accuracy[-1]:.4f}; stop histogram "
        f"{np.round(stop_hist, 3).tolist()}")
  print(f"- runner decisions vs the numpy runtime on the trace: {mismatch} of "
        f"{len(test_rows)} inputs differ")
  print(f"- FLOPs per input: backbone {backbone_flops / 1e6:.2f} M, all ramps "
        f"{traces.cost.sum() / 1e6:.2f} M, policy mean {mean_flops / 1e6:.2f} M: predicted "
        f"speedup {backbone_flops / mean_flops:.2f}x over the backbone "
        f"(evaluate's speedup over running every ramp: {test_ev.speedup[index]:.2f}x)")
  print(f"- setup (train/load, trace, fit, solve, export): {setup_s:.0f} s; load average "
        f"during timing {load[0]:.1f} -> {os.getloadavg()[0]:.1f} (other processes share "
        f"the cores: compare the two columns, measured on the same batches, not runs)")
  print()
  print("| batch | backbone ms/input (median) | runner ms/input (median) | measured speedup "
        "(median) | measured speedup (mean) | FLOPs speedup (evaluate) | latency-cost speedup "
        "(evaluate) |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for b, median, mean, lat_speedup, _ in rows:
    print(f"| {b} | {1e3 * median[0]:.3f} | {1e3 * median[1]:.3f} | "
          f"{median[0] / median[1]:.2f}x | {mean[0] / mean[1]:.2f}x | "
          f"{backbone_flops / mean_flops:.2f}x | {lat_speedup:.2f}x |")
  print()
  print("Per-segment (segment + its head) median ms per input at each batch size, "
        "beside the FLOPs share:")
  share = traces.cost / traces.cost.sum()
  print(f"- FLOPs share: {np.round(share, 3).tolist()}")
  for b, _, _, _, seg in rows:
    print(f"- batch {b}: {np.round(seg, 4).tolist()} ms, share "
          f"{np.round(seg / seg.sum(), 3).tolist()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
