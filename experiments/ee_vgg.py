"""Early-exit VGG on 32x32 images, trained on digits, and its exit traces.

The network is VGG-11/13/16 (torchvision's layer configurations "A"/"B"/"D",
channels divided by `width_div`) cut after chosen pooling stages into K backbone
`segments`, each followed by a ramp head:

    logits_k = heads[k](segments[k](...segments[0](x)))

Ramp K's head is the network's own classifier. The torch runtime
(`EarlyExitRunner(segments, heads, table)`) relies on exactly this structure.

Trace rows come from images the network never trained on. Digits has only
1,797 images, so each held-out image gives `copies` seeded random augmentations
(shift, rotation, scale, noise). Copies of one image are correlated and come as
consecutive rows (`rows // copies` is the source group): split fit/test on
contiguous blocks of rows, not on shuffled rows, to keep the splits independent.

Nothing is ever downloaded: weights come from a local file when given.
"""

import dataclasses
import math
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vgg as tv_vgg
from tqdm.auto import tqdm

import jexit

ARCHS = {"vgg11": "A", "vgg13": "B", "vgg16": "D"}
NUM_STAGES = 5  # every VGG configuration has five "M" pooling stages
# 1-based pooling stage after which each ramp sits; the last is the final head.
# (2, 3, 5) splits VGG-11's FLOPs about 16/36/48% and leaves ramp 1 clearly
# weaker than the final head, so exiting early is a real trade-off.
DEFAULT_RAMP_STAGES = {3: (2, 3, 5), 5: (1, 2, 3, 4, 5)}
# torchvision's ImageNet statistics, so a local torchvision VGG state dict
# sees the inputs it was trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------- the model

class InputNorm(nn.Module):
  """Maps `[B, 1 or 3, H, W]` images in [0, 1] to normalised `[B, 3, H, W]`.

  Part of segment 0, so the runner feeds raw images; grayscale is replicated
  to 3 channels so torchvision's 3-channel layer shapes apply unchanged.
  """

  def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

  def forward(self, x):
    if x.shape[1] == 1:
      x = x.expand(-1, 3, -1, -1)
    return (x - self.mean) / self.std


def ramp_head(channels: int, pool: int, num_classes: int) -> nn.Module:
  """Adaptive average pool to `pool x pool`, then one linear layer."""
  return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                       nn.Linear(channels * pool * pool, num_classes))


class EarlyExitVGG(nn.Module):
  """VGG backbone split into K segments, one ramp head after each.

  Args:
    arch: "vgg11", "vgg13" or "vgg16".
    ramp_stages: increasing 1-based pooling stages (1..5) that end a segment;
      the last must be 5 (the final head). Default: `DEFAULT_RAMP_STAGES[3]`.
    num_classes: classes of every head.
    width_div: divides every channel count (4: 16..128 channels).
    batch_norm: conv-BN-ReLU blocks (torchvision's `vgg*_bn`).
    head_pool: spatial size the intermediate heads pool to (4: 4x4; the
      first suite, experiments/traces, used 2); the final head pools to 1x1
      (a 32x32 input is 1x1 after five poolings anyway).

  Input `[B, 1 or 3, 32, 32]` in [0, 1]; `forward` returns K logits `[B, C]`.
  """

  def __init__(self, arch: str = "vgg11", ramp_stages: Sequence[int] = None,
               num_classes: int = 10, width_div: int = 4,
               batch_norm: bool = True, head_pool: int = 4):
    super().__init__()
    if arch not in ARCHS:
      raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    ramp_stages = tuple(DEFAULT_RAMP_STAGES[3] if ramp_stages is None
                        else ramp_stages)
    if (not ramp_stages or list(ramp_stages) != sorted(set(ramp_stages))
        or ramp_stages[0] < 1 or ramp_stages[-1] != NUM_STAGES):
      raise ValueError(f"ramp_stages: expected increasing stages in 1..5 "
                       f"ending with 5, got {ramp_stages}")
    if width_div < 1:
      raise ValueError(f"width_div: expected an int >= 1, got {width_div}")
    if head_pool < 1:
      raise ValueError(f"head_pool: expected an int >= 1, got {head_pool}")
    self.arch, self.ramp_stages, self.width_div = arch, ramp_stages, width_div
    cfg = [v if v == "M" else max(1, v // width_div) for v in tv_vgg.cfgs[ARCHS[arch]]]
    features = tv_vgg.make_layers(cfg, batch_norm=batch_norm)

    # Cut torchvision's flat `features` after the chosen MaxPools, remembering
    # where each of its layers went so a torchvision state dict can be loaded.
    segments, heads, layers, self._feature_names = [], [], [InputNorm()], {}
    stage, channels = 0, 3
    for i, layer in enumerate(features):
      self._feature_names[i] = f"segments.{len(segments)}.{len(layers)}"
      layers.append(layer)
      if isinstance(layer, nn.Conv2d):
        channels = layer.out_channels
      if isinstance(layer, nn.MaxPool2d):
        stage += 1
        if stage in ramp_stages:
          segments.append(nn.Sequential(*layers))
          pool = 1 if stage == NUM_STAGES else head_pool
          heads.append(ramp_head(channels, pool, num_classes))
          layers = []
    self.segments = nn.ModuleList(segments)
    self.heads = nn.ModuleList(heads)

  @property
  def num_ramps(self) -> int:
    return len(self.segments)

  def forward(self, x):
    logits = []
    for segment, head in zip(self.segments, self.heads):
      x = segment(x)
      logits.append(head(x))
    return logits


def build_model(arch: str = "vgg11", ramps: int = 3, **kwargs) -> EarlyExitVGG:
  """An `EarlyExitVGG` with the default ramp placement for 3 or 5 ramps."""
  if ramps not in DEFAULT_RAMP_STAGES:
    raise ValueError(f"ramps: expected one of {sorted(DEFAULT_RAMP_STAGES)} "
                     f"(or pass ramp_stages to EarlyExitVGG), got {ramps}")
  return EarlyExitVGG(arch, DEFAULT_RAMP_STAGES[ramps], **kwargs)


def load_weights(model: EarlyExitVGG, path) -> list:
  """Loads a local state dict (never downloads).

  Accepts this module's own state dict (strict) or a torchvision VGG one,
  whose `features.*` go to the backbone (its classifier is ImageNet's and is
  skipped; the heads keep their initialisation).

  Returns:
    The model's keys that the file did not set.
  """
  state = torch.load(path, map_location="cpu", weights_only=True)
  own = model.state_dict()
  if any(key.startswith("features.") for key in state):
    mapped = {}
    for key, value in state.items():
      parts = key.split(".")
      if parts[0] != "features":
        continue
      index = int(parts[1])
      if index not in model._feature_names:
        raise ValueError(f"weights {path}: {key} has no layer in {model.arch} "
                         f"(a different configuration?)")
      mapped[".".join([model._feature_names[index]] + parts[2:])] = value
    for key, value in mapped.items():
      if own[key].shape != value.shape:
        raise ValueError(f"weights {path}: {key} has shape {tuple(value.shape)}, "
                         f"the model {tuple(own[key].shape)} (width_div must be "
                         f"1 for torchvision weights)")
    result = model.load_state_dict(mapped, strict=False)
    return list(result.missing_keys)
  unknown = sorted(set(state) - set(own))
  missing = sorted(set(own) - set(state))
  if unknown or missing:
    raise ValueError(f"weights {path}: expected the keys of {model.arch} with "
                     f"{model.num_ramps} ramps, got unknown {unknown[:3]} and missing "
                     f"{missing[:3]} (a different --ramps or --arch?)")
  for key, value in state.items():
    if own[key].shape != value.shape:
      raise ValueError(f"weights {path}: {key} has shape {tuple(value.shape)}, the model "
                       f"{tuple(own[key].shape)} (saved with another --head-pool or "
                       f"--width-div?)")
  model.load_state_dict(state, strict=True)
  return []


# ------------------------------------------------------------------ the data

class Dataset(NamedTuple):
  """Images in [0, 1] and their labels."""
  images: torch.Tensor  # [N, C, H, W] float32, C = 1 or 3
  labels: torch.Tensor  # [N] int64
  num_classes: int
  name: str


def load_digits_images(size: int = 32) -> Dataset:
  """scikit-learn's 8x8 digits (values 0..16), bilinearly resized to `size`."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  digits = load_digits()
  x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
  x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
  return Dataset(x.clamp(0, 1), torch.tensor(digits.target, dtype=torch.int64),
                 10, "digits")


def load_image_folder(root, size: int = 32) -> Dataset:
  """A local `torchvision.datasets.ImageFolder`, resized and centre-cropped.

  Loads every image into memory: meant for small folders.
  """
  from torchvision import datasets, transforms
  transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                  transforms.ToTensor()])
  try:
    folder = datasets.ImageFolder(root, transform=transform)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise ValueError(f"image folder {root}: no images found: expected one sub-folder "
                     f"per class with images in it ({e})") from e
  if len(folder) == 0:
    raise ValueError(f"image folder {root}: no images found")
  images, labels = zip(*(folder[i] for i in range(len(folder))))
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


def trace_inputs(data: Dataset, held_rows: np.ndarray, copies: int, seed: int):
  """`copies` seeded augmentations of every held-out image, image-major.

  Returns:
    images `[R, C, H, W]`, labels `[R]`, source `[R]` (index into `data`
    of each row's image), R = copies * len(held_rows).
  """
  if copies < 1:
    raise ValueError(f"copies: expected an int >= 1, got {copies}")
  source = np.repeat(np.asarray(held_rows), copies)
  generator = torch.Generator().manual_seed(seed + 1)
  index = torch.as_tensor(source)
  return augment(data.images[index], generator), data.labels[index], source


# -------------------------------------------------------------- the training

def _batches(n: int, batch_size: int, generator: torch.Generator):
  perm = torch.randperm(n, generator=generator)
  return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _fit(params, loss_fn, images, labels, epochs, batch_size, lr,
         augment_train, generator, device, progress, desc):
  """Adam with a cosine schedule; `loss_fn(x, y)` returns a scalar."""
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
          temperature: float = 2.0) -> list:
  """Trains `model` in place on `images [N, C, H, W]`, `labels [N]`.

  joint: backbone and every head, loss = sum over ramps of cross-entropy.
  separate: backbone + final head for `epochs`; then, with the backbone frozen
    (BN statistics too), the other heads for `ramp_epochs` (default `epochs`),
    as when ramps are added to an already trained network.
  ramp_target (separate training): "labels", cross-entropy against the labels;
    "teacher", self-distillation: `temperature**2` x KL(final head || ramp
    head), both softened by `temperature` (Hinton et al., 2015), so the ramps
    learn to agree with the final ramp, the metric the policies are scored by.

  Returns:
    Mean training loss per epoch (phase 1 then phase 2).
  """
  if ramp_target not in ("labels", "teacher"):
    raise ValueError(f"ramp_target: expected 'labels' or 'teacher', got {ramp_target!r}")
  device = torch.device(device) if device is not None else default_device()
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

  def ramp_loss(x, y):
    loss = 0.0
    for segment, head in zip(model.segments[:-1], model.heads[:-1]):
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
  model.heads[:-1].train()  # the final head is the frozen teacher
  ramps = list(model.heads[:-1].parameters())
  if ramps:
    losses += _fit(ramps, ramp_loss if ramp_target == "labels" else distill_loss,
                   epochs=epochs if ramp_epochs is None else ramp_epochs,
                   desc="ramps", **common)
  return losses


# ------------------------------------------------------------ exit gates

class ExitGate(nn.Module):
  """Scores whether a ramp agrees with the final head, from the ramp's logits.

  A learned exit gate: an MLP (two hidden ReLU layers) on the ramp's
  log(1 - max softmax), its top-two log-probability gap and its log-softmax
  vector, standardised by statistics of its training inputs. `forward`
  returns the agreement logit `[B]`; `signal` the exit signal
  `1 - sigmoid(logit)` in [0, 1] (small when the ramp is likely right).
  """

  def __init__(self, num_classes: int, hidden: int = 64):
    super().__init__()
    width = num_classes + 2
    self.register_buffer("shift", torch.zeros(width))
    self.register_buffer("scale", torch.ones(width))
    self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

  @staticmethod
  def inputs(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), -1).clamp_min(-30.0)
    top2 = logp.topk(2, dim=-1).values
    log_err = torch.log((1.0 - top2[..., 0].exp()).clamp_min(1e-7))
    return torch.cat([log_err[..., None], (top2[..., 0] - top2[..., 1])[..., None], logp], -1)

  def forward(self, logits: torch.Tensor) -> torch.Tensor:
    return self.net((self.inputs(logits) - self.shift) / self.scale).squeeze(-1)

  def signal(self, logits: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.sigmoid(self(logits))


@torch.no_grad()
def _all_logits(model: EarlyExitVGG, images: torch.Tensor, device, batch_size=256):
  out = [model(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
  return [torch.cat([o[k] for o in out]).float().cpu() for k in range(model.num_ramps)]


def train_gates(model: EarlyExitVGG, images: torch.Tensor, *, copies: int = 8,
                epochs: int = 30, batch_size: int = 256, lr: float = 1e-3,
                weight_decay: float = 1e-2, hidden: int = 64, seed: int = 0,
                device=None) -> nn.ModuleList:
  """One `ExitGate` per ramp but the last, for a trained, frozen `model`.

  The gates learn, on `copies` seeded augmentations of the training images
  (never trace rows), whether ramp k's prediction equals the final head's:
  binary cross-entropy, AdamW. Set once, not tuned on trace rows:
  8 copies, 64 x 64 hidden units, 30 epochs, lr 1e-3, weight decay 1e-2.
  """
  device = torch.device(device) if device is not None else default_device()
  generator = torch.Generator().manual_seed(seed + 3)
  model.to(device).eval()
  x = augment(images.repeat(copies, 1, 1, 1), generator)
  logits = _all_logits(model, x, device)
  final = logits[-1].argmax(-1)
  return nn.ModuleList(
      train_gate(z, final, generator, hidden=hidden, epochs=epochs, batch_size=batch_size,
                 lr=lr, weight_decay=weight_decay) for z in logits[:-1])


def standardize(gate: nn.Module, logits: torch.Tensor) -> nn.Module:
  """Sets `gate.shift`/`gate.scale` to the mean and std of `ExitGate.inputs(logits)`."""
  inputs = ExitGate.inputs(logits)
  gate.shift.copy_(inputs.mean(0))
  gate.scale.copy_(inputs.std(0).clamp_min(1e-6))
  return gate


def train_gate(logits: torch.Tensor, final: torch.Tensor, generator: torch.Generator, *,
               hidden: int = 64, **fit_options) -> ExitGate:
  """An `ExitGate` trained (`fit_gate`) on ramp `logits [N, C]` to predict that
  their argmax equals `final [N]`, the final head's prediction."""
  gate = standardize(ExitGate(logits.shape[-1], hidden), logits)
  return fit_gate(gate, (logits,), (logits.argmax(-1) == final).float(), generator,
                  **fit_options)


def fit_gate(gate: nn.Module, inputs: Sequence[torch.Tensor], target: torch.Tensor,
             generator: torch.Generator, *, epochs: int = 30, batch_size: int = 256,
             lr: float = 1e-3, weight_decay: float = 1e-2) -> nn.Module:
  """Trains `gate(*inputs)` (agreement logits `[B]`) on `target [B]` in {0, 1}:
  binary cross-entropy, AdamW, shuffled by `generator`. Returns it in eval mode."""
  opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
  for _ in range(epochs):
    for rows in _batches(len(target), batch_size, generator):
      loss = F.binary_cross_entropy_with_logits(gate(*(x[rows] for x in inputs)),
                                                target[rows])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
  return gate.eval()


# ------------------------------------------------------ extraction and costs

SIGNALS = ("margin", "entropy", "gate")


def ramp_signal(probs: torch.Tensor, name: str) -> torch.Tensor:
  """An exit signal of softmax outputs `probs [..., C]`, small when sure:
  `"margin"`, 1 - (top probability - second); `"entropy"`, the entropy over
  log C (both in [0, 1])."""
  if name == "margin":
    top2 = probs.topk(2, dim=-1).values
    return 1.0 - (top2[..., 0] - top2[..., 1])
  if name == "entropy":
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return ent / np.log(probs.shape[-1])
  if name == "gate":
    raise ValueError("signal: 'gate' needs the trained gates (extract(..., gates=))")
  raise ValueError(f"signal: expected one of {SIGNALS}, got {name!r}")


@torch.no_grad()
def extract(model: EarlyExitVGG, images: torch.Tensor, batch_size: int = 256,
            device=None, progress: bool = False, signal: Optional[str] = None,
            gates: Optional[Sequence[ExitGate]] = None):
  """Every ramp's max softmax and argmax on `images [N, C, H, W]`.

  Returns:
    conf `[N, K]` float32 in [0, 1], pred `[N, K]` int64 (numpy), and with
    `signal` ("margin" or "entropy", see `ramp_signal`; "gate": `gates[k]`'s
    signal at ramp k < K - 1 and 1 - max softmax at the last ramp) that
    signal `[N, K]` float32 as a third value.
  """
  if signal is not None and signal not in SIGNALS:
    raise ValueError(f"signal: expected one of {SIGNALS}, got {signal!r}")
  if signal == "gate" and (gates is None or len(gates) != model.num_ramps - 1):
    raise ValueError(f"gates: signal 'gate' needs one gate per ramp but the last "
                     f"({model.num_ramps - 1}), got "
                     f"{None if gates is None else len(gates)}")
  device = torch.device(device) if device is not None else default_device()
  model.to(device).eval()
  if signal == "gate":
    gates = [g.to(device) for g in gates]
  conf, pred, sig = [], [], []
  for i in tqdm(range(0, len(images), batch_size), desc="extract",
                disable=not progress, leave=False):
    logits = model(images[i:i + batch_size].to(device))
    probs = torch.stack([z.float().softmax(-1) for z in logits], 1)  # [B, K, C]
    c, p = probs.max(-1)
    conf.append(c.cpu())
    pred.append(p.cpu())
    if signal == "gate":
      sig.append(torch.stack([g.signal(z) for g, z in zip(gates, logits)]
                             + [1.0 - c[:, -1]], 1).cpu())
    elif signal is not None:
      sig.append(ramp_signal(probs, signal).cpu())
  conf = torch.cat(conf).numpy().clip(0, 1).astype(np.float32)
  if signal is None:
    return conf, torch.cat(pred).numpy()
  return conf, torch.cat(pred).numpy(), torch.cat(sig).numpy().clip(0, 1).astype(np.float32)


def _device_of(model: nn.Module) -> torch.device:
  return next(model.parameters()).device


def _count_flops(fn) -> int:
  with FlopCounterMode(display=False) as counter:
    fn()
  return int(counter.get_total_flops())


@torch.no_grad()
def segment_flops(model: EarlyExitVGG, input_shape=(1, 32, 32)) -> np.ndarray:
  """`[K]` FLOPs of segment k plus ramp head k on one input `input_shape`.

  Counts what `FlopCounterMode` counts (convolutions and matmuls, 2 FLOPs per
  multiply-add); pooling, BN and ReLU are not counted. Sets eval mode.
  """
  model.eval()
  x = torch.zeros(1, *input_shape, device=_device_of(model))
  flops = []
  for segment, head in zip(model.segments, model.heads):
    flops.append(_count_flops(lambda: head(segment(x))))
    x = segment(x)
  return np.asarray(flops, np.int64)


@torch.no_grad()
def network_flops(model: EarlyExitVGG, input_shape=(1, 32, 32)) -> int:
  """FLOPs of the whole network (every ramp evaluated) on one input."""
  model.eval()
  return _count_flops(lambda: model(torch.zeros(1, *input_shape, device=_device_of(model))))


@torch.no_grad()
def segment_latency(model: EarlyExitVGG, input_shape=(1, 32, 32), device=None,
                    batch_size: int = 1, warmup: int = 20,
                    repeats: int = 100) -> np.ndarray:
  """`[K]` median wall-clock ms of segment k plus ramp head k on `device`.

  Warms up first (allocator, cuDNN algorithm choice, caches), then times the
  segments interleaved within each repeat so that drift (clock boost, other
  processes) hits every ramp alike; the median discards outliers. CUDA is
  synchronised around every timed call, since kernels run asynchronously.
  """
  device = torch.device(device) if device is not None else default_device()
  model = model.to(device).eval()
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  x = torch.rand(batch_size, *input_shape, device=device)
  inputs = []  # the input of each segment, computed once
  for segment in model.segments:
    inputs.append(x)
    x = segment(x)
  for _ in range(warmup):
    model(inputs[0])
  sync()
  times = np.zeros((repeats, model.num_ramps))
  for r in range(repeats):
    for k, (segment, head) in enumerate(zip(model.segments, model.heads)):
      sync()
      start = time.perf_counter()
      head(segment(inputs[k]))
      sync()
      times[r, k] = time.perf_counter() - start
  return 1e3 * np.median(times, axis=0)


# -------------------------------------------------------------- end to end

@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """What `make_traces` builds, trains and measures."""
  arch: str = "vgg11"
  ramps: int = 3                 # 3 or 5 (default placements), unless ramp_stages
  ramp_stages: Optional[tuple] = None
  width_div: int = 4
  head_pool: int = 4             # 2 for experiments/traces and its variants
  epochs: int = 10
  ramp_epochs: Optional[int] = None  # separate training's phase 2
  training: str = "separate"     # "separate" or "joint"
  ramp_target: str = "labels"    # separate training's phase 2: "labels" or "teacher"
  batch_size: int = 64
  lr: float = 3e-3
  augment_train: bool = True
  trace_frac: float = 0.4        # share of the images held out for traces
  copies: int = 4                # augmented trace rows per held-out image
  max_images: Optional[int] = None  # use a seeded subset (tests)
  seed: int = 0
  cost: str = "flops"            # "flops" or "latency"
  size: int = 32
  signal: Optional[str] = None   # also record traces.signal: "margin", "entropy" or "gate"


class TraceRun(NamedTuple):
  """A trained model, its traces, and where every row came from."""
  traces: jexit.Traces
  model: EarlyExitVGG
  train_rows: np.ndarray    # [T] image indices trained on
  trace_source: np.ndarray  # [N] image index of each trace row
  accuracy: np.ndarray      # [K] per-ramp accuracy on the trace rows
  agreement: np.ndarray     # [K] per-ramp agreement with the final ramp
  flops: np.ndarray         # [K] FLOPs per segment + head
  latency_ms: Optional[np.ndarray]  # [K] median ms, if measured
  losses: list              # training loss per epoch
  train_seconds: float
  gates: Optional[nn.ModuleList] = None  # signal "gate": ramp k's ExitGate, k < K - 1


def make_traces(config: TraceConfig = TraceConfig(), data: Optional[Dataset] = None,
                weights=None, device=None, progress: bool = False) -> TraceRun:
  """Builds, trains and traces an early-exit VGG.

  Args:
    config: the run's settings.
    data: images to use; default digits resized to `config.size`.
    weights: optional local state dict file (see `load_weights`).
    device: torch device; default CUDA when available, else CPU.
    progress: show tqdm bars (stderr).

  Returns:
    A `TraceRun`; `traces.cost` is FLOPs, or median ms if `config.cost` is
    "latency". pred and label are int16 to keep the files small.
  """
  if config.cost not in ("flops", "latency"):
    raise ValueError(f"cost: expected 'flops' or 'latency', got {config.cost!r}")
  if config.signal is not None and config.signal not in SIGNALS:
    raise ValueError(f"signal: expected one of {SIGNALS}, got {config.signal!r}")
  device = torch.device(device) if device is not None else default_device()
  torch.manual_seed(config.seed)
  data = data if data is not None else load_digits_images(config.size)
  n = len(data.images)
  if config.max_images is not None and config.max_images < n:
    keep = np.sort(np.random.default_rng(config.seed).permutation(n)[:config.max_images])
    data = data._replace(images=data.images[keep], labels=data.labels[keep])
    n = len(keep)
  train_rows, held_rows = split_rows(n, config.trace_frac, config.seed)
  x, y, source = trace_inputs(data, held_rows, config.copies, config.seed)

  stages = config.ramp_stages or DEFAULT_RAMP_STAGES.get(config.ramps)
  if stages is None:
    raise ValueError(f"ramps: expected 3 or 5 without ramp_stages, got {config.ramps}")
  model = EarlyExitVGG(config.arch, stages, data.num_classes, config.width_div,
                       head_pool=config.head_pool)
  if weights is not None:
    load_weights(model, weights)
  start = time.perf_counter()
  index = torch.as_tensor(train_rows)
  losses = train(model, data.images[index], data.labels[index],
                 epochs=config.epochs, ramp_epochs=config.ramp_epochs,
                 training=config.training, batch_size=config.batch_size,
                 lr=config.lr, augment_train=config.augment_train,
                 seed=config.seed, device=device, progress=progress,
                 ramp_target=config.ramp_target)
  gates = (train_gates(model, data.images[index], seed=config.seed, device=device)
           if config.signal == "gate" else None)
  train_seconds = time.perf_counter() - start

  out = extract(model, x, device=device, progress=progress, signal=config.signal,
                gates=gates)
  conf, pred = out[:2]
  label = y.numpy()
  input_shape = tuple(data.images.shape[1:])
  flops = segment_flops(model, input_shape)
  latency = (segment_latency(model, input_shape, device)
             if config.cost == "latency" else None)
  cost = latency if latency is not None else flops.astype(np.float64)
  traces = jexit.check_traces(jexit.Traces(
      conf=conf, pred=pred.astype(np.int16), label=label.astype(np.int16), cost=cost,
      signal=out[2] if config.signal is not None else None))
  return TraceRun(traces=traces, model=model, train_rows=train_rows,
                  trace_source=source, accuracy=(pred == label[:, None]).mean(0),
                  agreement=(pred == pred[:, -1:]).mean(0), flops=flops,
                  latency_ms=latency, losses=losses, train_seconds=train_seconds,
                  gates=gates)
