"""The trace recipe of the early-exit VGG (`jexit.vgg`): data, training, recording.

`make_traces` is the whole recipe behind `jexit record --arch ...` and the
trace suites in `experiments/`: build, train (the backbone and final head, then
the ramp heads on the frozen backbone; or all jointly), record the held-out
rows. Data: scikit-learn's embedded 8x8 digits (`load_digits_images`) or a
local `ImageFolder` (`load_image_folder`). Trace rows come from images the
network never trained on. Digits has only 1,797 images, so each held-out image
gives `copies` seeded random augmentations (shift, rotation, scale, noise).
Copies of one image are consecutive rows (`rows // copies` is the source
group): split fit/test on contiguous blocks of rows, not on shuffled rows, to
keep the splits independent.
"""

import dataclasses
import math
import os
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jexit import record as rec
from jexit import signals
from jexit.traces import check_traces
from jexit.types import Traces
from jexit.vgg import DEFAULT_RAMP_STAGES, MIN_SIZE, NUM_STAGES, EarlyExitVGG, load_weights

__all__ = ["Dataset", "TraceConfig", "TraceRun", "augment", "load_digits_images",
           "load_image_folder", "make_traces", "split_rows", "trace_inputs", "train"]


# ------------------------------------------------------------------ the data

class Dataset(NamedTuple):
  """Images in [0, 1] and their labels."""
  images: torch.Tensor  # [N, C, H, W] float32, C = 1 or 3
  labels: torch.Tensor  # [N] int64
  num_classes: int
  name: str


def load_digits_images(size: int = 32) -> Dataset:
  """scikit-learn's 8x8 digits (values 0..16), bilinearly resized to `size`."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  if not isinstance(size, int) or size < MIN_SIZE:
    raise ValueError(f"size: expected an int >= {MIN_SIZE}, got {size!r}")
  digits = load_digits()  # bundled with scikit-learn: no download
  x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
  x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
  return Dataset(x.clamp(0, 1), torch.tensor(digits.target, dtype=torch.int64),
                 10, "digits")


def load_image_folder(root, size: Optional[int] = 32) -> Dataset:
  """A local `torchvision.datasets.ImageFolder` (one sub-folder per class).

  Args:
    root: the folder.
    size: resize the shorter side to `size`, then centre-crop `size x size`;
      None keeps the images as they are (they must then all have one size).

  Loads every image into memory: meant for small folders.

  Raises:
    ValueError: no images, images of different sizes (with size=None) or
      smaller than 32x32, or a bad size.
  """
  from torchvision import datasets, transforms  # pylint: disable=import-outside-toplevel
  if size is not None and (not isinstance(size, int) or size < MIN_SIZE):
    raise ValueError(f"size: expected an int >= {MIN_SIZE} (VGG pools {NUM_STAGES} times) "
                     f"or None, got {size!r}")
  steps = [] if size is None else [transforms.Resize(size), transforms.CenterCrop(size)]
  transform = transforms.Compose(steps + [transforms.ToTensor()])
  if not os.path.isdir(root):
    raise ValueError(f"image folder {root}: no such folder")
  try:
    folder = datasets.ImageFolder(root, transform=transform)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise ValueError(f"image folder {root}: no images found: expected one sub-folder "
                     f"per class with images in it ({e})") from e
  if len(folder) == 0:
    raise ValueError(f"image folder {root}: no images found")
  images, labels = zip(*(folder[i] for i in range(len(folder))))
  shapes = [tuple(im.shape[1:]) for im in images]
  if len(set(shapes)) > 1:
    other = next(i for i, s in enumerate(shapes) if s != shapes[0])
    raise ValueError(f"image folder {root}: expected images of one size, got "
                     f"{shapes[0][0]}x{shapes[0][1]} ({folder.samples[0][0]}) and "
                     f"{shapes[other][0]}x{shapes[other][1]} ({folder.samples[other][0]}); "
                     f"pass a size to resize them (jexit record --size)")
  if min(shapes[0]) < MIN_SIZE:
    raise ValueError(f"image folder {root}: expected images of at least {MIN_SIZE}x{MIN_SIZE} "
                     f"pixels (VGG pools {NUM_STAGES} times), got {shapes[0][0]}x{shapes[0][1]} "
                     f"({folder.samples[0][0]}); pass a size >= {MIN_SIZE} to resize them")
  return Dataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64),
                 len(folder.classes), str(root))


def split_rows(n: int, trace_frac: float, seed: int):
  """Seeded disjoint split of `n` image indices.

  Returns:
    train_rows `[n - m]`, held_rows `[m]` (sorted), m = round(trace_frac * n).
  """
  if not 0 < trace_frac < 1:
    raise ValueError(f"trace_frac: expected a value in (0, 1), got {trace_frac}")
  perm = np.random.default_rng(seed).permutation(n)
  m = min(n - 1, max(1, int(round(trace_frac * n))))
  return np.sort(perm[m:]), np.sort(perm[:m])


def augment(images: torch.Tensor, generator: torch.Generator,
            max_shift: float = 2.0, max_degrees: float = 12.0,
            max_scale: float = 0.1, noise: float = 0.05) -> torch.Tensor:
  """Random affine (shift in pixels, rotation, scale) plus Gaussian noise.

  Works in [0, 1] pixel space so that the zero padding is the (black) digits
  background. Args: images `[B, C, H, W]`. Returns: `[B, C, H, W]` in [0, 1].
  """
  b, _, h, w = images.shape
  u = lambda: 2 * torch.rand(b, generator=generator) - 1  # Uniform[-1, 1]
  angle = u() * math.radians(max_degrees)
  scale = 1 + u() * max_scale
  # affine_grid maps output to input coordinates in [-1, 1]: a pixel is 2 / w.
  tx, ty = u() * max_shift * 2 / w, u() * max_shift * 2 / h
  cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
  theta = torch.stack([torch.stack([cos, -sin, tx], 1),
                       torch.stack([sin, cos, ty], 1)], 1)
  grid = F.affine_grid(theta, list(images.shape), align_corners=False)
  out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False)
  out = out + noise * torch.randn(out.shape, generator=generator)
  return out.clamp(0, 1)


def trace_inputs(data: Dataset, held_rows: np.ndarray, copies: int, seed: int,
                 augmented: bool = True):
  """`copies` seeded augmentations of every held-out image, image-major.

  With `augmented=False` (one copy only) the held-out images as they are.

  Returns:
    images `[R, C, H, W]`, labels `[R]`, source `[R]` (index into `data`
    of each row's image), R = copies * len(held_rows).
  """
  if copies < 1:
    raise ValueError(f"copies: expected an int >= 1, got {copies}")
  if not augmented and copies != 1:
    raise ValueError(f"copies: expected 1 without augmentation, got {copies}")
  source = np.repeat(np.asarray(held_rows), copies)
  generator = torch.Generator().manual_seed(seed + 1)
  index = torch.as_tensor(source)
  images = data.images[index]
  return (augment(images, generator) if augmented else images), data.labels[index], source


# -------------------------------------------------------------- the training

def _batches(n: int, batch_size: int, generator: torch.Generator):
  perm = torch.randperm(n, generator=generator)
  return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _fit(params, loss_fn, images, labels, epochs, batch_size, lr,
         augment_train, generator, device, progress, desc):
  """Adam with a cosine schedule; `loss_fn(x, y)` returns a scalar."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  if epochs <= 0:
    return []
  opt = torch.optim.Adam(params, lr=lr)
  steps = epochs * math.ceil(len(images) / batch_size)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                              pct_start=0.15)
  losses = []
  bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
  for _ in bar:
    total = 0.0
    for rows in _batches(len(images), batch_size, generator):
      x = images[rows]
      if augment_train:
        x = augment(x, generator)
      loss = loss_fn(x.to(device), labels[rows].to(device))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
      total += loss.item() * len(rows)
    losses.append(total / len(images))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  return losses


def train(model: EarlyExitVGG, images: torch.Tensor, labels: torch.Tensor, *,
          epochs: int = 10, ramp_epochs: Optional[int] = None,
          training: str = "separate", batch_size: int = 64, lr: float = 3e-3,
          augment_train: bool = True, seed: int = 0, device=None,
          progress: bool = False, ramp_target: str = "labels",
          temperature: float = 2.0, final_head: bool = False) -> list:
  """Trains `model` in place on `images [N, C, H, W]`, `labels [N]`.

  joint: backbone and every head, loss = sum over ramps of cross-entropy.
  separate: backbone + final head for `epochs`; then, with the backbone frozen
    (BN statistics too), the other heads for `ramp_epochs` (default `epochs`),
    as when ramps are added to an already trained network. `final_head=True`
    trains the final head in that phase too (a backbone loaded from a
    torchvision file, whose ImageNet classifier is not loaded).
  ramp_target (separate training): "labels", cross-entropy against the labels;
    "teacher", self-distillation: `temperature**2` x KL(final head || ramp
    head), both softened by `temperature` (Hinton et al., 2015), so the ramps
    learn to agree with the final ramp, the metric the policies are scored by.

  Returns:
    Mean training loss per epoch (phase 1 then phase 2).
  """
  if ramp_target not in ("labels", "teacher"):
    raise ValueError(f"ramp_target: expected 'labels' or 'teacher', got {ramp_target!r}")
  if final_head and ramp_target != "labels":
    raise ValueError("final_head: the final head cannot learn from itself; expected "
                     "ramp_target='labels'")
  device = rec.resolve_device(device)
  generator = torch.Generator().manual_seed(seed + 2)
  model.to(device)
  ce = nn.functional.cross_entropy
  common = dict(images=images, labels=labels, batch_size=batch_size, lr=lr,
                augment_train=augment_train, generator=generator,
                device=device, progress=progress)
  if training == "joint":
    model.train()
    return _fit(list(model.parameters()),
                lambda x, y: sum(ce(z, y) for z in model(x)),
                epochs=epochs, desc="joint", **common)
  if training != "separate":
    raise ValueError(f"training: expected 'joint' or 'separate', got {training!r}")

  def final_loss(x, y):
    for segment in model.segments:
      x = segment(x)
    return ce(model.heads[-1](x), y)

  model.train()
  backbone = list(model.segments.parameters()) + list(model.heads[-1].parameters())
  losses = _fit(backbone, final_loss, epochs=epochs, desc="backbone", **common)
  trained = model.heads if final_head else model.heads[:-1]

  def ramp_loss(x, y):
    loss = 0.0
    for segment, head in zip(model.segments[:len(trained)], trained):
      with torch.no_grad():
        x = segment(x)
      loss = loss + ce(head(x), y)
    return loss

  def distill_loss(x, _):
    feats = []
    with torch.no_grad():
      for segment in model.segments:
        x = segment(x)
        feats.append(x)
      teacher = nn.functional.log_softmax(model.heads[-1](x) / temperature, -1)
    loss = 0.0
    for f, head in zip(feats[:-1], model.heads[:-1]):
      student = nn.functional.log_softmax(head(f) / temperature, -1)
      loss = loss + temperature**2 * nn.functional.kl_div(
          student, teacher, log_target=True, reduction="batchmean")
    return loss

  model.eval()  # the frozen backbone keeps its BN running statistics
  trained.train()  # without final_head, the final head is the frozen teacher
  ramps = list(trained.parameters())
  if ramps:
    losses += _fit(ramps, ramp_loss if ramp_target == "labels" else distill_loss,
                   epochs=epochs if ramp_epochs is None else ramp_epochs,
                   desc="ramps", **common)
  return losses


# -------------------------------------------------------------- end to end

@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """What `make_traces` builds, trains and measures."""
  arch: str = "vgg11"
  ramps: int = 3                 # 3 or 5 (default placements), unless ramp_stages
  ramp_stages: Optional[tuple] = None
  width_div: int = 4
  batch_norm: bool = True
  head_pool: int = 4             # 2 for experiments/traces/pool2 and its variants
  epochs: int = 10
  ramp_epochs: Optional[int] = None  # separate training's phase 2
  training: str = "separate"     # "separate" or "joint"
  ramp_target: str = "labels"    # separate training's phase 2: "labels" or "teacher"
  batch_size: int = 64
  lr: float = 3e-3
  augment_train: bool = True
  trace_frac: float = 0.4        # share of the images held out for traces
  copies: int = 4                # augmented trace rows per held-out image
  augment_trace: bool = True     # False: the held-out images as they are (copies = 1)
  max_images: Optional[int] = None  # use a seeded subset (tests)
  seed: int = 0
  cost: str = "flops"            # "flops" or "latency"
  size: int = 32
  signal: Optional[str] = None   # also record traces.signal: "margin" or "entropy"
  record_batch_size: int = 256   # inputs per recording pass
  latency_batch_size: int = 1    # cost "latency": ms per input at this batch size


class TraceRun(NamedTuple):
  """A trained model, its traces, and where every row came from."""
  traces: Traces            # with head_cost; cost is FLOPs or ms (config.cost)
  model: EarlyExitVGG
  train_rows: np.ndarray    # [T] image indices trained on
  trace_source: np.ndarray  # [N] image index of each trace row
  accuracy: np.ndarray      # [K] per-ramp accuracy on the trace rows
  agreement: np.ndarray     # [K] per-ramp agreement with the final ramp
  flops: np.ndarray         # [K] FLOPs per segment + head
  latency_ms: Optional[np.ndarray]  # [K] median ms per segment + head, if measured
  losses: list              # training loss per epoch
  train_seconds: float
  signal_fns: Optional[list] = None  # the K functions of `ramp_signals`, if given


def make_traces(config: TraceConfig = TraceConfig(), data: Optional[Dataset] = None,
                weights=None, device=None, progress: bool = False,
                ramp_signals: Optional[Callable] = None) -> TraceRun:
  """Builds, trains and traces an early-exit VGG.

  Args:
    config: the run's settings.
    data: images to use; default digits resized to `config.size`.
    weights: optional local state dict file (see `load_weights`). If it does
      not set the final head (a torchvision file) and `config.epochs` is 0,
      the ramp phase trains the final head too.
    device: torch device; default CUDA when available, else CPU.
    progress: show tqdm bars (stderr).
    ramp_signals: optional `(model, train_images) -> K functions logits
      [B, C] -> [B]`, called after training: their values are recorded as
      `traces.signal` (e.g. learned exit gates); excludes `config.signal`.

  Returns:
    A `TraceRun`; `traces.cost` is FLOPs, or median ms at batch size 1 if
    `config.cost` is "latency", and `traces.head_cost` the heads' part of it.
    pred and label are int16 to keep the files small.
  """
  if config.cost not in rec.COSTS:
    raise ValueError(f"cost: expected one of {list(rec.COSTS)}, got {config.cost!r}")
  if config.signal is not None and config.signal not in signals.RECORDED:
    raise ValueError(f"signal: expected one of {sorted(signals.RECORDED)} or None, got "
                     f"{config.signal!r}")
  if config.signal is not None and ramp_signals is not None:
    raise ValueError(f"ramp_signals: expected config.signal None with it, got "
                     f"{config.signal!r}")
  device = rec.resolve_device(device)
  torch.manual_seed(config.seed)
  data = data if data is not None else load_digits_images(config.size)
  n = len(data.images)
  if config.max_images is not None and config.max_images < n:
    keep = np.sort(np.random.default_rng(config.seed).permutation(n)[:config.max_images])
    data = data._replace(images=data.images[keep], labels=data.labels[keep])
    n = len(keep)
  if n < 2:
    raise ValueError(f"data: expected at least 2 images (some to train on, some to "
                     f"trace), got {n}")
  train_rows, held_rows = split_rows(n, config.trace_frac, config.seed)
  x, y, source = trace_inputs(data, held_rows, config.copies, config.seed,
                              augmented=config.augment_trace)

  stages = config.ramp_stages or DEFAULT_RAMP_STAGES.get(config.ramps)
  if stages is None:
    raise ValueError(f"ramps: expected 3 or 5 without ramp_stages, got {config.ramps}")
  model = EarlyExitVGG(config.arch, stages, data.num_classes, config.width_div,
                       batch_norm=config.batch_norm, head_pool=config.head_pool)
  missing = load_weights(model, weights) if weights is not None else []
  ramp_epochs = config.epochs if config.ramp_epochs is None else config.ramp_epochs
  if (any(key.startswith("heads.") for key in missing) and config.epochs == 0
      and (config.training == "joint" or ramp_epochs == 0)):
    raise ValueError(f"ramp_epochs: weights {weights} set no ramp heads (a torchvision "
                     f"file), so they need training; expected ramp_epochs > 0 (jexit "
                     f"record --train-ramps EPOCHS), got {ramp_epochs}")
  final_head = config.epochs == 0 and any(
      key.startswith(f"heads.{model.num_ramps - 1}.") for key in missing)
  start = time.perf_counter()
  index = torch.as_tensor(train_rows)
  losses = train(model, data.images[index], data.labels[index],
                 epochs=config.epochs, ramp_epochs=config.ramp_epochs,
                 training=config.training, batch_size=config.batch_size,
                 lr=config.lr, augment_train=config.augment_train,
                 seed=config.seed, device=device, progress=progress,
                 ramp_target=config.ramp_target, final_head=final_head)
  signal_fns = (list(ramp_signals(model, data.images[index])) if ramp_signals is not None
                else None)
  train_seconds = time.perf_counter() - start

  traces = rec.record(model.segments, model.heads, (x, y), batch_size=config.record_batch_size,
                      device=device, signal=config.signal or signal_fns, progress=progress,
                      desc="record")
  flops = traces.cost.astype(np.int64)
  latency = None
  if config.cost == "latency":
    b = config.latency_batch_size
    batch = x[:1].repeat(b, *([1] * (x.ndim - 1))).to(device)
    seg_ms, head_ms = rec.measure_latency(model.segments, model.heads, batch,
                                          warmup=20, repeats=100)
    seg_ms, head_ms = seg_ms / b, head_ms / b
    latency = seg_ms + head_ms
    traces = traces._replace(cost=latency, head_cost=head_ms)
  pred, label = traces.pred, traces.label
  traces = check_traces(traces._replace(pred=pred.astype(np.int16),
                                        label=label.astype(np.int16)))
  return TraceRun(traces=traces, model=model, train_rows=train_rows,
                  trace_source=source, accuracy=(pred == label[:, None]).mean(0),
                  agreement=(pred == pred[:, -1:]).mean(0), flops=flops,
                  latency_ms=latency, losses=losses, train_seconds=train_seconds,
                  signal_fns=signal_fns)
