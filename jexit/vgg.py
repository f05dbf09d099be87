"""Early-exit VGG-11/13/16, the ready case of `jexit.record` (the `torch` extra).

The network is VGG-11/13/16 (torchvision's layer configurations "A"/"B"/"D",
`torchvision.models.vgg.cfgs`, channels divided by `width_div`) cut after
chosen pooling stages into K backbone `segments`, each followed by a ramp head:

    logits_k = heads[k](segments[k](...segments[0](x)))

Ramp K's head is the network's own classifier. `jexit.record.record` and the
torch runtime (`EarlyExitRunner(model.segments, model.heads, table)`) take it
in exactly this form.

Weights come from a local file only (`load_weights`: this module's own state
dict, or torchvision's `vgg*` / `vgg*_bn` ImageNet file for the backbone);
nothing is ever downloaded. `segment_flops` and `segment_latency` measure the
cost of each segment and its head. The data, the training and the trace recipe
behind `jexit record --arch ...` are `jexit.vgg_traces`.
"""

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models import vgg as tv_vgg

from jexit import record as rec

__all__ = ["ARCHS", "DEFAULT_RAMP_STAGES", "EarlyExitVGG", "InputNorm", "MIN_SIZE",
           "build_model", "load_weights", "network_flops", "ramp_head", "segment_flops",
           "segment_latency"]

ARCHS = {"vgg11": "A", "vgg13": "B", "vgg16": "D"}
# Conv layers per configuration, to name the VGG a torchvision file holds.
_CONVS = {sum(v != "M" for v in cfg): name for name, cfg in tv_vgg.cfgs.items()}
_CONV_ARCH = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
NUM_STAGES = 5  # every VGG configuration has five "M" pooling stages
MIN_SIZE = 2 ** NUM_STAGES  # smallest input side that survives five 2x2 poolings
# 1-based pooling stage after which each ramp sits; the last is the final head.
# (2, 3, 5) splits VGG-11's FLOPs about 16/36/48% and leaves ramp 1 clearly
# weaker than the final head, so exiting early is a real trade-off.
DEFAULT_RAMP_STAGES = {3: (2, 3, 5), 5: (1, 2, 3, 4, 5)}
# torchvision's ImageNet statistics, so a local torchvision VGG state dict
# sees the inputs it was trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < MIN_SIZE:
      raise ValueError(f"images: expected [B, 1 or 3, H, W] with H, W >= {MIN_SIZE} "
                       f"(VGG pools {NUM_STAGES} times), got shape {tuple(x.shape)}")
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
    width_div: divides every channel count (1: torchvision's 64..512
      channels; 4: 16..128).
    batch_norm: conv-BN-ReLU blocks (torchvision's `vgg*_bn`).
    head_pool: spatial size the intermediate heads pool to (4: 4x4; the
      first suite, experiments/traces/pool2, used 2); the final head pools to 1x1
      (a 32x32 input is 1x1 after five poolings anyway).

  Input `[B, 1 or 3, H, W]` in [0, 1], H, W >= 32; `forward` returns K
  logits `[B, C]`.
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
    if num_classes < 2:
      raise ValueError(f"num_classes: expected an int >= 2, got {num_classes}")
    self.arch, self.ramp_stages, self.width_div = arch, ramp_stages, width_div
    self.batch_norm, self.head_pool = batch_norm, head_pool
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


def _read_state(path) -> dict:
  if not os.path.isfile(path):
    raise ValueError(f"weights {path}: no such file")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike: a file we cannot use
    raise ValueError(f"weights {path}: could not read it as a torch state dict "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if (not isinstance(state, dict)
      or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
    raise ValueError(f"weights {path}: expected a state dict (names -> tensors), got "
                     f"{type(state).__name__}")
  return state


def load_weights(model: EarlyExitVGG, path) -> list:
  """Loads a local state dict (never downloads).

  Accepts this module's own state dict (strict) or a torchvision VGG one,
  whose `features.*` go to the backbone (its classifier is ImageNet's and is
  skipped; the heads keep their initialisation).

  Returns:
    The model's keys that the file did not set.

  Raises:
    ValueError: for a missing or unreadable file, or weights of another
      architecture, batch-norm setting, ramp placement, head pooling or width.
  """
  state = _read_state(path)
  own = model.state_dict()
  if any(key.startswith("features.") for key in state):
    has_bn = any(key.startswith("features.") and key.endswith(".running_mean")
                 for key in state)
    convs = sorted({int(key.split(".")[1]) for key, v in state.items()
                    if key.startswith("features.") and key.endswith(".weight") and v.ndim == 4})
    file_arch = _CONV_ARCH.get(_CONVS.get(len(convs)), f"a VGG with {len(convs)} conv layers")
    if file_arch != model.arch:
      raise ValueError(f"weights {path}: torchvision {file_arch} weights "
                       f"({len(convs)} conv layers), the model is {model.arch} (--arch "
                       f"{file_arch}?)")
    if has_bn != model.batch_norm:
      raise ValueError(f"weights {path}: torchvision {model.arch}"
                       f"{'_bn' if has_bn else ''} weights ({'with' if has_bn else 'no'} "
                       f"batch norm), the model has {'batch norm' if model.batch_norm else 'none'} "
                       f"(build it with batch_norm={has_bn}; jexit record: "
                       f"{'drop ' if has_bn else ''}--no-batch-norm)")
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
      if key not in own:
        raise ValueError(f"weights {path}: {key} does not fit {model.arch}'s layers "
                         f"(a different configuration?)")
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
                     f"{missing[:3]} (a different --ramps, --arch or batch norm?)")
  for key, value in state.items():
    if own[key].shape != value.shape:
      raise ValueError(f"weights {path}: {key} has shape {tuple(value.shape)}, the model "
                       f"{tuple(own[key].shape)} (saved with another --head-pool, "
                       f"--width-div or class count?)")
  model.load_state_dict(state, strict=True)
  return []


# ------------------------------------------------------------------ costs

@torch.no_grad()
def segment_flops(model: EarlyExitVGG, input_shape=(1, 32, 32)) -> np.ndarray:
  """`[K]` FLOPs of segment k plus ramp head k on one input `input_shape`
  (`jexit.record.count_flops`: convolutions and matmuls, 2 FLOPs per
  multiply-add; pooling, BN and ReLU are not counted). Sets eval mode."""
  model.eval()
  x = torch.zeros(1, *input_shape, device=_device_of(model))
  seg, head = rec.count_flops(model.segments, model.heads, x)
  return seg + head


@torch.no_grad()
def network_flops(model: EarlyExitVGG, input_shape=(1, 32, 32)) -> int:
  """FLOPs of the whole network (every ramp evaluated) on one input."""
  model.eval()
  return rec.flops_of(lambda: model(torch.zeros(1, *input_shape, device=_device_of(model))))


@torch.no_grad()
def segment_latency(model: EarlyExitVGG, input_shape=(1, 32, 32), device=None,
                    batch_size: int = 1, warmup: int = 20,
                    repeats: int = 100) -> np.ndarray:
  """`[K]` median wall-clock ms of segment k plus ramp head k on `device`,
  per call on `batch_size` random inputs (`jexit.record.measure_latency`)."""
  device = rec.resolve_device(device)
  model = model.to(device).eval()
  x = torch.rand(batch_size, *input_shape, device=device)
  seg, head = rec.measure_latency(model.segments, model.heads, x, warmup=warmup,
                                  repeats=repeats)
  return seg + head


def _device_of(model: nn.Module) -> torch.device:
  return next(model.parameters()).device
