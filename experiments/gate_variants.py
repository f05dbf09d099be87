"""Three more exit-gate variants on the VGG-13 suite networks (issue 7).

experiments/reports/GATE.md's gates are trained on augmented training images of the
network they serve. Per workload, this script retrains the suite network
exactly (same seed; checked against experiments/traces/pool2) and measures:

1. `suite gate`: `ee_vgg.train_gates`, as in experiments/traces/gate.
2. `out-of-fold gate`: the training images are split into 5 folds; a network
   of the same recipe is trained on four, and the fifth's ramp logits (8
   augmented copies) are the gate's training data, so the gate learns from
   disagreements as they occur on inputs a network has not seen. The gate is
   then applied to the suite network.
3. `trace-fitted gate`: fitted on the suite network's trace rows themselves,
   cross-fitted over 5 folds of blocks of 4 rows (one image's copies stay
   together); its scores are held out. A reference: realistic data from the
   very network the gate serves, not a deployable recipe.
4. `feature gate`: reads the ramp's feature map as well as its logits (a 1x1
   convolution to 16 channels, ReLU, a linear layer, added to a linear layer of
   the suite gate's inputs, then 64 ReLU units), trained like the suite gate
   (weight decay 0.1). Its FLOPs are counted.

Prints each ramp's AUC of "ramp k agrees with the final head" on the trace
rows for every variant, then `jexit budget`'s rule (union.py's protocol: 5
outer seeds x 5 folds) on the feature gates' signal, with the gates' FLOPs
added to the ramps' costs and without.

Usage (torch extra; about 8 min per workload on one CPU thread):
  python experiments/gate_variants.py [--workloads vgg13:3,vgg13:5]
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jexit  # pylint: disable=wrong-import-position
from jexit.traces import fold_rows  # pylint: disable=wrong-import-position
from experiments import ee_vgg, quality, union  # pylint: disable=wrong-import-position

SEEDS = (0, 1, 2, 3, 4)
COPIES = 8  # augmented copies of the training images, as train_gates


class FeatureGate(nn.Module):
  """Agreement logit from a ramp's feature map `[B, ch, hw, hw]` and logits."""

  def __init__(self, channels: int, hw: int, num_classes: int, reduce: int = 16,
               hidden: int = 64):
    super().__init__()
    self.features = nn.Sequential(nn.Conv2d(channels, reduce, 1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(reduce * hw * hw, hidden))
    self.register_buffer("shift", torch.zeros(num_classes + 2))
    self.register_buffer("scale", torch.ones(num_classes + 2))
    self.logits = nn.Linear(num_classes + 2, hidden)
    self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 1))

  def forward(self, feature_map, logits):
    u = (ee_vgg.ExitGate.inputs(logits) - self.shift) / self.scale
    return self.out(self.features(feature_map) + self.logits(u)).squeeze(-1)


@torch.no_grad()
def features_and_logits(model, images, batch_size=256):
  """Per ramp: the feature map its head reads `[N, ...]` and its logits."""
  maps, logits = [[] for _ in model.segments], [[] for _ in model.segments]
  for i in range(0, len(images), batch_size):
    h = images[i:i + batch_size]
    for k, (segment, head) in enumerate(zip(model.segments, model.heads)):
      h = segment(h)
      maps[k].append(h)
      logits[k].append(head(h))
  return [torch.cat(m) for m in maps], [torch.cat(z) for z in logits]


def trained(config, data, rows, seed):
  torch.manual_seed(seed)
  model = ee_vgg.EarlyExitVGG(config.arch, ee_vgg.DEFAULT_RAMP_STAGES[config.ramps],
                              data.num_classes, config.width_div, head_pool=config.head_pool)
  index = torch.as_tensor(np.sort(rows))
  ee_vgg.train(model, data.images[index], data.labels[index], epochs=config.epochs,
               training=config.training, batch_size=config.batch_size, lr=config.lr,
               seed=seed, device="cpu")
  return model.eval()


def signal_of(gate, *inputs):
  with torch.no_grad():
    return (1.0 - torch.sigmoid(gate(*inputs))).numpy()


def run(arch: str, ramps: int):
  start = time.perf_counter()
  config = ee_vgg.TraceConfig(arch=arch, ramps=ramps, head_pool=2)  # experiments/traces/pool2
  data = ee_vgg.load_digits_images(config.size)
  train_rows, held_rows = ee_vgg.split_rows(len(data.images), config.trace_frac, config.seed)
  x, _, _ = ee_vgg.trace_inputs(data, held_rows, config.copies, config.seed)
  suite = jexit.load_traces(os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "pool2",
                                         f"digits_{arch}_{ramps}ramps.npz"))
  model = trained(config, data, train_rows, config.seed)
  maps, logits = features_and_logits(model, x)
  conf = np.stack([z.softmax(-1).max(-1).values.numpy() for z in logits], 1)
  if not np.array_equal(conf, suite.conf):
    raise RuntimeError(f"{arch}/{ramps}: the retrained network differs from the suite's")
  final = logits[-1].argmax(-1)
  agree = [(z.argmax(-1) == final).numpy() for z in logits[:-1]]
  train_images = data.images[torch.as_tensor(train_rows)]
  signals = {"1 - conf": [1.0 - conf[:, k] for k in range(ramps - 1)],
             "suite gate": [signal_of(g, z) for g, z in
                            zip(ee_vgg.train_gates(model, train_images, seed=config.seed,
                                                   device="cpu"), logits)]}

  # Out-of-fold: the fifth of the training images each network did not see.
  generator = torch.Generator().manual_seed(config.seed + 3)
  folds = np.array_split(np.random.default_rng(config.seed).permutation(train_rows), 5)
  oof = [[] for _ in logits]
  for f, hold in enumerate(folds):
    other = trained(config, data, np.setdiff1d(train_rows, hold), config.seed + 100 + f)
    images = ee_vgg.augment(data.images[torch.as_tensor(np.sort(hold))].repeat(COPIES, 1, 1, 1),
                            generator)
    for k, z in enumerate(features_and_logits(other, images)[1]):
      oof[k].append(z)
  oof = [torch.cat(z) for z in oof]
  signals["out-of-fold gate"] = [
      signal_of(ee_vgg.train_gate(oof[k], oof[-1].argmax(-1), generator), logits[k])
      for k in range(ramps - 1)]

  # Trace-fitted, cross-fitted over blocks of one image's copies.
  fitted = []
  for k in range(ramps - 1):
    s = np.zeros(len(x), np.float32)
    for fit, held in fold_rows(len(x), 5, seed=0, block=config.copies):
      fit, held = torch.as_tensor(fit), torch.as_tensor(held)
      gate = ee_vgg.train_gate(logits[k][fit], final[fit], generator, epochs=100)
      s[held.numpy()] = signal_of(gate, logits[k][held])
    fitted.append(s)
  signals["trace-fitted gate"] = fitted

  # Feature gates, trained on the suite gates' data: 8 augmented copies of the
  # training images (same generator seed as train_gates).
  generator = torch.Generator().manual_seed(config.seed + 3)
  train_maps, train_logits = features_and_logits(
      model, ee_vgg.augment(train_images.repeat(COPIES, 1, 1, 1), generator))
  feature, flops = [], np.zeros(ramps)
  for k in range(ramps - 1):
    torch.manual_seed(config.seed)
    gate = ee_vgg.standardize(
        FeatureGate(maps[k].shape[1], maps[k].shape[2], logits[k].shape[-1]), train_logits[k])
    gate = ee_vgg.fit_gate(gate, (train_maps[k], train_logits[k]),
                           (train_logits[k].argmax(-1) == train_logits[-1].argmax(-1)).float(),
                           generator, weight_decay=0.1)
    feature.append(signal_of(gate, maps[k], logits[k]))
    one = (maps[k][:1], logits[k][:1])
    flops[k] = ee_vgg._count_flops(lambda g=gate, x=one: g(*x))  # pylint: disable=protected-access
  signals["feature gate"] = feature

  print(f"\n### {arch}, {ramps} ramps ({time.perf_counter() - start:.0f} s to train and fit)\n")
  print("AUC of \"ramp k agrees with the final head\" on the trace rows:\n")
  print("| signal | " + " | ".join(f"ramp {k + 1}" for k in range(ramps - 1)) + " |")
  print("|---|" + "---:|" * (ramps - 1))
  for name, s in signals.items():
    print(f"| {name} | " + " | ".join(f"{roc_auc_score(agree[k], -s[k]):.3f}"
                                    for k in range(ramps - 1))
          + " |")
  print("\nfeature gate FLOPs per ramp: " + ", ".join(f"{f:,.0f}" for f in flops[:-1])
        + " (segment + head: " + ", ".join(f"{c:,.0f}" for c in suite.cost) + ")")

  signal = np.stack(feature + [1.0 - conf[:, -1]], 1).astype(np.float32)
  print(f"\n`jexit budget`'s rule on the feature gates' signal, held out, mean over "
        f"{len(SEEDS)} seeds x 5 folds (the best external baseline reads conf):\n")
  print("| gate FLOPs | " + " | ".join(f"loss <= {t * 100:g}%" for t in quality.TARGETS) + " |")
  print("|---|" + "---|" * len(quality.TARGETS))
  for charged in (True, False):
    traces = suite._replace(signal=signal, cost=suite.cost + (flops if charged else 0.0))
    cells = {t: [] for t in quality.TARGETS}
    for seed in SEEDS:
      for t, (mine, external) in union.budget_vs_external(traces, 5, 4, 4, 300, seed).items():
        cells[t].append((mine.mean(), max(v.mean() for v in external.values())))
    print(f"| {'charged' if charged else 'not charged'} | " + " | ".join(
        f"{np.mean([a for a, _ in c]):.2f}x vs {np.mean([b for _, b in c]):.2f}x"
        for c in cells.values()) + " |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="vgg13:3,vgg13:5",
                      help="comma-separated arch:ramps of the suite")
  parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  for item in args.workloads.split(","):
    arch, ramps = item.split(":")
    run(arch, int(ramps))


if __name__ == "__main__":
  main()
