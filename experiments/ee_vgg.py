"""Early-exit VGG traces for the experiments: `jexit.vgg`, plus learned exit gates.

The network, its weights, the digits/ImageFolder data, the training and the
trace recipe live in the installed package (`jexit.vgg`, `jexit.vgg_traces`,
recording in `jexit.record`); this module re-exports them under the names the experiments
use, and adds the research-only learned exit gates (experiments/reports/GATE.md):
`make_traces(TraceConfig(signal="gate"))` trains one `ExitGate` per ramp but
the last after the network and records `1 - P(agree with the final head)` as
the traces' signal.
"""

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jexit import record as rec
from jexit import vgg_traces
from jexit.record import default_device, flops_of
from jexit.runtime_torch import max_softmax
from jexit.vgg import (ARCHS, DEFAULT_RAMP_STAGES, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                       NUM_STAGES, EarlyExitVGG, InputNorm, build_model, load_weights,
                       network_flops, ramp_head, segment_flops, segment_latency, tv_vgg)
from jexit.vgg_traces import _batches  # noqa: F401  (the gates shuffle as the training does)
from jexit.vgg_traces import (Dataset, TraceConfig, TraceRun, augment,  # noqa: F401
                              load_digits_images, load_image_folder, split_rows, trace_inputs,
                              train)

__all__ = ["ARCHS", "DEFAULT_RAMP_STAGES", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_STAGES",
           "SIGNALS", "Dataset", "EarlyExitVGG", "ExitGate", "InputNorm", "TraceConfig",
           "TraceRun", "augment", "build_model", "default_device", "fit_gate", "gates_of",
           "load_digits_images", "load_image_folder", "load_weights", "make_traces",
           "network_flops", "ramp_head", "segment_flops", "segment_latency", "split_rows",
           "standardize", "trace_inputs", "train", "train_gate", "train_gates", "tv_vgg"]

SIGNALS = ("margin", "entropy", "gate")
_count_flops = flops_of  # gate_variants counts its gates' FLOPs with it


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


def gates_of(run: TraceRun) -> nn.ModuleList:
  """The `ExitGate`s of a `make_traces(TraceConfig(signal="gate"))` run."""
  return nn.ModuleList(f.__self__ for f in run.signal_fns[:-1])


def make_traces(config: TraceConfig = TraceConfig(), data: Optional[Dataset] = None,
                weights=None, device=None, progress: bool = False) -> TraceRun:
  """`jexit.vgg_traces.make_traces`, and with `config.signal == "gate"` the learned
  gates (`train_gates`, on the training images after the network is trained)
  as the recorded signal, `1 - max softmax` at the last ramp (`gates_of(run)`
  returns the gates)."""
  if config.signal != "gate":
    return vgg_traces.make_traces(config, data, weights, device, progress)

  def gate_signals(model, train_images):
    gates = train_gates(model, train_images, seed=config.seed, device=device)
    gates.to(rec.resolve_device(device))
    return [g.signal for g in gates] + [lambda z: 1.0 - max_softmax(z)[0]]

  return vgg_traces.make_traces(dataclasses.replace(config, signal=None), data, weights, device,
                         progress, ramp_signals=gate_signals)
