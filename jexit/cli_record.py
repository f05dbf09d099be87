"""`jexit record` and `jexit import-apparate`: the two ways in to a trace .npz.

  jexit record --arch vgg11|vgg13|vgg16 [--ramps 3|5|2,4,5] [--weights W] --out TRACE.npz
  jexit import-apparate PICKLE --out TRACE.npz --allow-pickle [--cost 1,2,3]

`record` builds, trains and records an early-exit VGG with torch
(`jexit[torch]`; docs/record.md; any other torch model: `jexit.record.record`);
`import-apparate` converts an Apparate profile pickle with a restricted
unpickler. Errors are ValueErrors; `jexit.cli.main` prints them as one
`jexit: error: ...` line and exits with 2.
"""

import os

from jexit.checks import check_output_path


def add_parsers(sub) -> None:
  """Adds the `import-apparate` and `record` subcommands to `jexit`'s subparsers."""
  p = sub.add_parser("import-apparate", help="convert an Apparate pickle to a trace .npz",
                     description="Reads an Apparate profile pickle ({'conf', 'acc'} per "
                                 "ramp) with a restricted unpickler and writes a trace.")
  p.add_argument("pickle", help="Apparate profile pickle")
  p.add_argument("--out", required=True, help="trace .npz to write")
  p.add_argument("--allow-pickle", action="store_true", dest="allow_pickle",
                 help="required: unpickling can run code; only for files you trust")
  p.add_argument("--cost", help="comma-separated segment costs (default 1 per segment)")
  p.set_defaults(func=run_import_apparate)
  _add_record_parser(sub)


def run_import_apparate(args) -> int:
  from jexit.importers import load_apparate  # pylint: disable=import-outside-toplevel
  from jexit.traces import save_traces  # pylint: disable=import-outside-toplevel
  check_output_path("--out", args.out)
  cost = None
  if args.cost:
    try:
      cost = [float(v) for v in args.cost.split(",")]
    except ValueError as e:
      raise ValueError(f"--cost: expected comma-separated numbers, got {args.cost!r}") from e
  traces = load_apparate(args.pickle, allow_pickle=args.allow_pickle, cost=cost)
  save_traces(args.out, traces)
  print(f"wrote {args.out}: {traces.num_inputs} inputs, {traces.num_ramps} ramps, "
        f"cost {traces.cost.tolist()}" + ("" if cost else " (default: 1 per segment)"))
  return 0


def _add_record_parser(sub):
  """Adds `jexit record --arch vgg11|vgg13|vgg16 ... --out TRACE.npz` (torch extra)."""
  p = sub.add_parser(
      "record", help="train and record an early-exit VGG's trace (needs jexit[torch])",
      description="Builds an early-exit VGG-11/13/16 (torchvision's layer configurations), "
                  "loads local weights if given, trains what needs training on the training "
                  "images, runs every ramp over held-out images and writes the trace: conf, "
                  "pred, label, cost and head_cost (FLOPs or measured ms) per ramp. Never "
                  "downloads anything. For any other torch model: jexit.record.record "
                  "(docs/record.md).")
  p.add_argument("--arch", required=True, choices=("vgg11", "vgg13", "vgg16"))
  p.add_argument("--ramps", default="3",
                 help="3 or 5 (the default placements: after pooling stages 2,3,5 or 1..5), "
                      "or comma-separated pooling stages in 1..5 ending with 5, e.g. 2,4,5")
  p.add_argument("--weights", help="local state dict: one --save-weights wrote, or "
                                   "torchvision's vgg*/vgg*_bn ImageNet file (backbone only; "
                                   "needs --width-div 1)")
  data = p.add_mutually_exclusive_group()
  data.add_argument("--digits", action="store_true",
                    help="scikit-learn's embedded 8x8 digits, resized (the default)")
  data.add_argument("--images", metavar="DIR",
                    help="a local ImageFolder: one sub-folder of images per class")
  p.add_argument("--size", type=int, default=None,
                 help="image side in pixels (>= 32): digits are resized to it (default 32); "
                      "--images are resized and centre-cropped to it (default: kept as they "
                      "are, and must then all have one size)")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs of the backbone and final head (default 10, or 0 with --weights)")
  p.add_argument("--train-ramps", type=int, default=None, dest="train_ramps", metavar="EPOCHS",
                 help="epochs of the ramp heads on the frozen backbone (default --epochs); a "
                      "torchvision --weights file sets no head, so its final head trains "
                      "with them")
  p.add_argument("--joint", action="store_true",
                 help="train the backbone and every head together for --epochs instead")
  p.add_argument("--width-div", type=int, default=1, dest="width_div",
                 help="divide every channel count by this (default 1: torchvision's widths)")
  p.add_argument("--head-pool", type=int, default=4, dest="head_pool",
                 help="the ramp heads average-pool to this n x n before their linear layer")
  p.add_argument("--no-batch-norm", action="store_true", dest="no_batch_norm",
                 help="conv-ReLU blocks without batch norm (torchvision's vgg11, not vgg11_bn)")
  p.add_argument("--cost", choices=("flops", "latency"), default="flops",
                 help="cost per ramp: FLOPs (default) or median ms per input measured on "
                      "--device at --latency-batch-size")
  p.add_argument("--latency-batch-size", type=int, default=1, dest="latency_batch_size")
  p.add_argument("--batch-size", type=int, default=256, dest="batch_size",
                 help="inputs per recording pass (default 256)")
  p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
  p.add_argument("--signal", choices=("margin", "entropy"), default=None,
                 help="also record each ramp's margin (1 - top1 + top2) or normalised entropy "
                      "as the trace's signal")
  p.add_argument("--trace-frac", type=float, default=0.4, dest="trace_frac",
                 help="share of the images held out for the trace (default 0.4)")
  p.add_argument("--copies", type=int, default=None,
                 help="trace rows per held-out image, as seeded augmentations (digits: 4; "
                      "--images: 1, the image itself)")
  p.add_argument("--max-images", type=int, default=None, dest="max_images",
                 help="use a seeded subset of this many images")
  p.add_argument("--seed", type=int, default=0, help="seed of the split, model and training")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  p.add_argument("--save-weights", default=None, dest="save_weights",
                 help="write the trained model's state dict here (serve it: docs/serve.md)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--out", required=True, help="trace .npz to write")
  p.set_defaults(func=run_record)


def run_record(args) -> int:
  check_output_path("--out", args.out)  # before torch's import and the training
  if args.save_weights is not None:
    check_output_path("--save-weights", args.save_weights)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from jexit import vgg, vgg_traces  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"jexit record needs torch, torchvision, scikit-learn and tqdm: "
                      f"pip install 'jexit[torch]' ({e})") from e
  from jexit.record import resolve_device  # pylint: disable=import-outside-toplevel
  from jexit.traces import save_traces  # pylint: disable=import-outside-toplevel
  try:
    stages = tuple(int(v) for v in args.ramps.split(","))
  except ValueError:
    raise ValueError(f"--ramps: expected 3, 5 or comma-separated pooling stages like 2,3,5, "
                     f"got {args.ramps!r}") from None
  if len(stages) == 1 and stages[0] in vgg.DEFAULT_RAMP_STAGES:
    stages = vgg.DEFAULT_RAMP_STAGES[stages[0]]
  if (len(stages) < 2 or list(stages) != sorted(set(stages)) or stages[0] < 1
      or stages[-1] != vgg.NUM_STAGES):
    raise ValueError(f"--ramps: expected 3, 5 or increasing pooling stages in 1..5 ending "
                     f"with 5 (at least two ramps), got {args.ramps!r}")
  for flag, value, low in (("--size", args.size, vgg.MIN_SIZE), ("--epochs", args.epochs, 0),
                           ("--train-ramps", args.train_ramps, 0), ("--width-div", args.width_div, 1),
                           ("--head-pool", args.head_pool, 1), ("--batch-size", args.batch_size, 1),
                           ("--latency-batch-size", args.latency_batch_size, 1),
                           ("--copies", args.copies, 1), ("--max-images", args.max_images, 2),
                           ("--threads", args.threads, 1), ("--seed", args.seed, 0)):
    if value is not None and value < low:
      raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
  if not 0 < args.trace_frac < 1:
    raise ValueError(f"--trace-frac: expected a share in (0, 1), got {args.trace_frac}")
  if args.weights is not None and not os.path.isfile(args.weights):
    raise ValueError(f"--weights: no such file {args.weights!r}")
  if args.joint and args.train_ramps is not None:
    raise ValueError("--train-ramps: joint training (--joint) trains every head with the "
                     "backbone for --epochs; expected no --train-ramps")
  device = resolve_device(args.device, field="--device")
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.images is not None:
    data = vgg_traces.load_image_folder(args.images, size=args.size)
  else:
    data = vgg_traces.load_digits_images(args.size or 32)
  epochs = args.epochs if args.epochs is not None else (0 if args.weights else 10)
  copies = args.copies or (1 if args.images is not None else 4)
  config = vgg_traces.TraceConfig(
      arch=args.arch, ramp_stages=stages, width_div=args.width_div,
      batch_norm=not args.no_batch_norm, head_pool=args.head_pool, epochs=epochs,
      ramp_epochs=args.train_ramps, training="joint" if args.joint else "separate",
      trace_frac=args.trace_frac, copies=copies,
      augment_trace=args.images is None or copies > 1, max_images=args.max_images,
      seed=args.seed, cost=args.cost, size=int(data.images.shape[-1]), signal=args.signal,
      record_batch_size=args.batch_size, latency_batch_size=args.latency_batch_size)
  run = vgg_traces.make_traces(config, data=data, weights=args.weights, device=device,
                        progress=not args.quiet)
  save_traces(args.out, run.traces)
  t = run.traces
  unit = "FLOPs" if args.cost == "flops" else "ms"
  print(f"wrote {args.out}: {t.num_inputs} inputs ({data.name}, {copies} per held-out image), "
        f"{t.num_ramps} ramps of {args.arch} after pooling stages {list(stages)}, trained "
        f"in {run.train_seconds:.0f} s on {device}")
  print("  accuracy  " + " ".join(f"{a:.4f}" for a in run.accuracy))
  print("  agreement " + " ".join(f"{a:.4f}" for a in run.agreement))
  print(f"  cost ({unit}) " + " ".join(f"{c:.4g}" for c in t.cost)
        + "  (heads: " + " ".join(f"{c:.4g}" for c in t.head_cost) + ")")
  if args.save_weights:
    torch.save(run.model.state_dict(), args.save_weights)
    print(f"wrote {args.save_weights} (state dict of jexit.vgg.EarlyExitVGG({args.arch!r}, "
          f"{stages}, num_classes={data.num_classes}, width_div={args.width_div}, "
          f"batch_norm={not args.no_batch_norm}, head_pool={args.head_pool}))")
  block = f" --block {copies}" if copies > 1 else ""
  print(f"next: jexit budget {args.out} --max-loss 0.01{block}")
  return 0
