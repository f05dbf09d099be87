"""Trains early-exit VGGs on digits (or a local ImageFolder) and writes traces.

One model:
  python experiments/make_traces.py --arch vgg11 --ramps 3 --out t.npz
The benchmark suite of issue 7 (digits_{vgg11,vgg13,vgg16}_{3,5}ramps.npz,
experiments/reports/CONFIRM.md):
  python experiments/make_traces.py --all experiments/traces/pool4_s1 --seed 1
The first suite, experiments/traces/pool2 (TRACES.md), had 2x2 heads:
  python experiments/make_traces.py --all experiments/traces/pool2 --head-pool 2

Never downloads anything: `--weights` and `--image-folder` are local paths.
The code is `jexit.vgg` and `jexit.vgg_traces` (and `jexit record`, its installed command line);
`experiments/ee_vgg.py` adds the learned exit gates of `--signal gate`.
"""

import argparse
import dataclasses
import os
import sys

# Run as a script, sys.path[0] is experiments/; the repo root holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import jexit  # noqa: E402
from experiments import ee_vgg  # noqa: E402

SUITE_ARCHS = ("vgg11", "vgg13", "vgg16")
SUITE_RAMPS = (3, 5)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--out", help="trace .npz to write (one model)")
  what.add_argument("--all", metavar="OUTDIR",
                    help="write the suite {data}_{arch}_{K}ramps.npz for "
                         "vgg11/13/16 x 3/5 ramps into OUTDIR")
  d = ee_vgg.TraceConfig()
  p.add_argument("--arch", default=d.arch, choices=sorted(ee_vgg.ARCHS))
  p.add_argument("--ramps", type=int, default=d.ramps, choices=(3, 5))
  p.add_argument("--ramp-stages", default=None,
                 help="comma-separated pooling stages (1..5, ending with 5) "
                      "that carry a ramp; overrides --ramps")
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--epochs", type=int, default=d.epochs,
                 help="training epochs (separate: of the backbone phase)")
  p.add_argument("--ramp-epochs", type=int, default=None,
                 help="separate training: epochs of the ramp phase (default --epochs)")
  p.add_argument("--head-pool", type=int, default=d.head_pool,
                 help="spatial size (n x n) the intermediate ramp heads average-pool to "
                      "before their linear layer (experiments/traces/pool2 and its variants: 2)")
  p.add_argument("--width-div", type=int, default=d.width_div,
                 help="divide VGG channel counts by this (1 = torchvision widths)")
  p.add_argument("--training", default=d.training, choices=("separate", "joint"))
  p.add_argument("--ramp-target", default=d.ramp_target, choices=("labels", "teacher"),
                 help="separate training: the ramps learn the labels, or the final "
                      "head's softened output (self-distillation)")
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--lr", type=float, default=d.lr)
  p.add_argument("--no-augment-train", action="store_true",
                 help="train on the plain images (trace rows stay augmented)")
  p.add_argument("--trace-frac", type=float, default=d.trace_frac,
                 help="share of the images held out for the trace rows")
  p.add_argument("--copies", type=int, default=d.copies,
                 help="augmented trace rows per held-out image (correlated)")
  p.add_argument("--signal", default=None, choices=ee_vgg.SIGNALS,
                 help="also record each ramp's margin (1 - top1 + top2), normalised "
                      "entropy, or learned exit gate's 1 - P(agree) (ee_vgg.train_gates) "
                      "as the traces' signal; conf and pred are unchanged")
  p.add_argument("--head-cost", action="store_true", dest="head_cost",
                 help="also write each ramp head's part of the cost (traces.head_cost; "
                      "the suites in experiments/ were made without it)")
  p.add_argument("--latency", action="store_true",
                 help="cost = measured median ms per segment instead of FLOPs")
  p.add_argument("--image-folder", default=None,
                 help="local torchvision ImageFolder to use instead of digits")
  p.add_argument("--weights", default=None,
                 help="local state dict to start from (ours or torchvision VGG)")
  p.add_argument("--save-weights", default=None,
                 help="write the trained state dict here (with --out)")
  p.add_argument("--save-gates", default=None,
                 help="write the exit gates' state dict here (with --out --signal gate)")
  p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p.parse_args(argv)


def summary(name, run):
  t = run.traces
  kb = os.path.getsize(name) / 1024 if os.path.exists(name) else float("nan")
  lines = [f"{name}: N={t.num_inputs} K={t.num_ramps} ({kb:.0f} KB), "
           f"trained in {run.train_seconds:.0f} s",
           "  accuracy  " + " ".join(f"{a:.4f}" for a in run.accuracy),
           "  agreement " + " ".join(f"{a:.4f}" for a in run.agreement),
           "  FLOPs     " + " ".join(f"{f}" for f in run.flops)]
  if run.latency_ms is not None:
    lines.append("  ms        " + " ".join(f"{m:.4f}" for m in run.latency_ms))
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  stages = (tuple(int(s) for s in args.ramp_stages.split(","))
            if args.ramp_stages else None)
  config = ee_vgg.TraceConfig(
      arch=args.arch, ramps=args.ramps, ramp_stages=stages,
      width_div=args.width_div, head_pool=args.head_pool, epochs=args.epochs,
      ramp_epochs=args.ramp_epochs,
      training=args.training, ramp_target=args.ramp_target, batch_size=args.batch_size, lr=args.lr,
      augment_train=not args.no_augment_train, trace_frac=args.trace_frac,
      copies=args.copies, seed=args.seed, signal=args.signal,
      cost="latency" if args.latency else "flops")
  data = (ee_vgg.load_image_folder(args.image_folder) if args.image_folder
          else ee_vgg.load_digits_images(config.size))

  if args.out:
    jobs = [(config, args.out)]
  else:
    os.makedirs(args.all, exist_ok=True)
    prefix = "digits" if not args.image_folder else os.path.basename(
        os.path.normpath(args.image_folder))
    jobs = [(dataclasses.replace(config, arch=arch, ramps=k, ramp_stages=None),
             os.path.join(args.all, f"{prefix}_{arch}_{k}ramps.npz"))
            for arch in SUITE_ARCHS for k in SUITE_RAMPS]
  for cfg, path in jobs:
    run = ee_vgg.make_traces(cfg, data=data, weights=args.weights,
                             device=args.device, progress=not args.quiet)
    # The suites predate head_cost: without --head-cost their files stay byte-identical.
    jexit.save_traces(path, run.traces if args.head_cost
                      else run.traces._replace(head_cost=None))
    if args.save_weights and args.out:
      torch.save(run.model.state_dict(), args.save_weights)
    if args.save_gates and args.out and run.signal_fns is not None:
      torch.save(ee_vgg.gates_of(run).state_dict(), args.save_gates)
    print(summary(path, run), flush=True)


if __name__ == "__main__":
  main()
