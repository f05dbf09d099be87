"""Ramp placement on candidate-rich digits VGG traces (issue 26; docs/place.md).

Records, once (cached under experiments/traces/place/), digits VGG-11/13/16
(channels / 4, batch norm) with a candidate ramp after every conv layer (the
conv-BN-ReLU block, with the pooling that follows it), each a 4x4-pooled
linear head; VGG-11 also gets a 2x2-pooled head at every position (two
candidate heads per position: size as well as place). The backbone and its
final head are trained first (`jexit.vgg_traces.train`), then every candidate head on
the frozen backbone. Each network is recorded twice: FLOPs costs and
measured-latency costs (median ms per input at batch size 1 on one core of
this CPU, `torch.set_num_threads(1)`).

Then `jexit.place.place` at 0.5/1/2/5% agreement-loss budgets, split 50/50
in blocks of the 4 augmented copies of an image, against: all candidate
ramps (the last head at each position), evenly spaced subsets of each size,
Apparate-style greedy placement and the paper's three ramps (after pooling
stages 2, 3 and 5), all on the same rows. Writes
experiments/reports/PLACEMENT.md and .json.

  python experiments/place.py [--epochs 8] [--archs vgg11,vgg13,vgg16]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jexit  # noqa: E402
from jexit import place as pl  # noqa: E402
from jexit import report  # noqa: E402
from jexit import vgg, vgg_traces  # noqa: E402
from jexit.record import record  # noqa: E402

TRACES = os.path.join(ROOT, "experiments", "traces", "place")
REPORT = os.path.join(ROOT, "experiments", "reports", "PLACEMENT")
BUDGETS = (0.005, 0.01, 0.02, 0.05)
BLOCK = 4  # augmented copies per held-out image: a split keeps them together
PAPER_STAGES = (2, 3, 5)  # jexit.vgg.DEFAULT_RAMP_STAGES[3]
VARIANTS = {"vgg11": (2, 4), "vgg13": (4,), "vgg16": (4,)}  # head pools per position


def per_conv(model: vgg.EarlyExitVGG):
  """`(segments, channels, stage)`: the trained backbone cut after every
  conv-BN-ReLU block (a MaxPool joins the block before it); `stage[p]` is the
  number of poolings done by the end of segment p."""
  layers = [m for s in model.segments for m in s]
  segments, current, channels, stage, pools, ch = [], [], [], [], 0, 3
  for i, layer in enumerate(layers):
    current.append(layer)
    if isinstance(layer, nn.Conv2d):
      ch = layer.out_channels
    if isinstance(layer, nn.MaxPool2d):
      pools += 1
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    if isinstance(layer, (nn.ReLU, nn.MaxPool2d)) and not isinstance(nxt, nn.MaxPool2d):
      segments.append(nn.Sequential(*current).eval())
      channels.append(ch)
      stage.append(pools)
      current = []
  assert not current
  return segments, channels, stage


def train_heads(segments, heads, images, labels, epochs, seed):
  """Every candidate head on the frozen backbone: Adam, cross-entropy, the
  training augmentation of `jexit.vgg_traces`."""
  params = [p for group in heads for h in group for p in h.parameters()]
  opt = torch.optim.Adam(params, lr=3e-3)
  g = torch.Generator().manual_seed(seed + 7)
  ce = nn.functional.cross_entropy
  for _ in range(epochs):
    for rows in torch.randperm(len(images), generator=g).split(64):
      x = vgg_traces.augment(images[rows], g)
      y = labels[rows]
      loss = 0.0
      with torch.no_grad():
        feats = []
        for s in segments:
          x = s(x)
          feats.append(x)
      for f, group in zip(feats, heads):
        for h in group:
          loss = loss + ce(h(f), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()


def make(arch, epochs, seed=0):
  """Trains and records one candidate network: `{cost: Traces}`, `paper`."""
  torch.manual_seed(seed)
  torch.set_num_threads(1)  # batch-1 serving on one core; steadier latency on a shared CPU
  data = vgg_traces.load_digits_images(32)
  train_rows, held = vgg_traces.split_rows(len(data.images), 0.4, seed)
  x, y, _ = vgg_traces.trace_inputs(data, held, 4, seed)
  model = vgg.EarlyExitVGG(arch, (5,), data.num_classes, width_div=4, batch_norm=True)
  idx = torch.as_tensor(train_rows)
  images, labels = data.images[idx], data.labels[idx]
  vgg_traces.train(model, images, labels, epochs=epochs, ramp_epochs=0, seed=seed, device="cpu")
  model.eval()
  segments, channels, stage = per_conv(model)
  heads = [[vgg.ramp_head(c, p, data.num_classes) for p in VARIANTS[arch]]
           for c in channels[:-1]] + [[model.heads[0]]]
  for group in heads[:-1]:
    for h in group:
      h.train()
  train_heads(segments, heads[:-1], images, labels, epochs, seed)
  for group in heads:
    for h in group:
      h.eval()
  flat = [h if len(h) > 1 else h[0] for h in heads]
  out = {}
  for cost in ("flops", "latency"):
    t = record(segments, flat, (x, y), batch_size=256, device="cpu", cost=cost,
               warmup=20, repeats=100, progress=False)
    out[cost] = t._replace(pred=t.pred.astype(np.int16), label=t.label.astype(np.int16))
  # The paper's three ramps: after pooling stages 2, 3 and 5 (the last head there).
  pos = np.repeat(np.arange(len(heads)), [len(h) for h in heads])
  ends = [max(p for p in range(len(stage)) if stage[p] == s) for s in PAPER_STAGES]
  paper = tuple(int(np.flatnonzero(pos == p)[-1]) for p in ends)
  return out, paper


def load_or_make(arch, epochs, folder=TRACES):
  os.makedirs(folder, exist_ok=True)
  paths = {c: os.path.join(folder, f"digits_{arch}_{c}.npz") for c in ("flops", "latency")}
  meta = os.path.join(folder, f"digits_{arch}.json")
  if all(os.path.exists(p) for p in paths.values()) and os.path.exists(meta):
    with open(meta) as f:
      info = json.load(f)
    if info["epochs"] == epochs:
      return ({c: jexit.load_traces(p) for c, p in paths.items()}, tuple(info["paper"]),
              info["seconds"])
  start = time.perf_counter()
  traces, paper = make(arch, epochs)
  seconds = time.perf_counter() - start
  for c, p in paths.items():
    jexit.save_traces(p, traces[c])
  with open(meta, "w") as f:
    json.dump({"paper": list(paper), "epochs": epochs, "seconds": round(seconds, 1)}, f)
  return traces, paper, seconds


def row(name, e):
  if e is None:
    return f"| {name} | - | - | - |"
  return (f"| {name} | {e['test']['speedup']:.3f} | {1 - e['test']['agreement']:.4f} | "
          f"{len(e['active_ramps'])}: {e['active_ramps']} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", type=int, default=8)
  ap.add_argument("--archs", default="vgg11,vgg13,vgg16")
  ap.add_argument("--costs", default="flops,latency")
  ap.add_argument("--traces", default=TRACES, help="folder of the recorded traces (cache)")
  ap.add_argument("--report", default=REPORT, help="report path without extension")
  args = ap.parse_args()
  results, lines = {}, []
  for arch in args.archs.split(","):
    traces, paper, seconds = load_or_make(arch, args.epochs, args.traces)
    for cost in args.costs.split(","):
      t = traces[cost]
      start = time.perf_counter()
      res = pl.place(t, list(BUDGETS), block=BLOCK, fixed={"paper": paper})  # defaults
      wall = time.perf_counter() - start
      name = f"{arch}/{cost}"
      results[name] = dict(report.placement_to_dict(res, f"experiments/traces/place/digits_{arch}_{cost}.npz"),
                           wall_s=round(wall, 1), record_s=seconds, paper=list(paper),
                           position=None if t.position is None else t.position.tolist())
      print(report.format_placement(res, name), flush=True)
      print(f"{name}: {wall:.1f} s", flush=True)
      lines.append(f"\n### {name}: K = {t.num_ramps} candidates, {len(res.subsets)} subsets "
                   f"x {len(res.lambdas)} lam, {res.solve_calls} solve call(s), "
                   f"{res.timings['solve_s']:.1f} s solve, {wall:.0f} s in all\n")
      lines.append(f"cost {[round(c, 4) for c in t.cost.tolist()]}, head_cost "
                   f"{[round(c, 4) for c in t.head_cost.tolist()]}"
                   + ("" if t.position is None else f", position {t.position.tolist()}") + "\n")
      lines.append("| budget | method | held-out speedup | held-out loss | ramps |")
      lines.append("|---|---|---|---|---|")
      for b in res.budgets:
        size = None if b.placed is None else len(b.placed["active_ramps"])
        entries = [("placed", b.placed), ("all ramps", b.methods["all_ramps"]),
                   (f"evenly spaced, {size}", b.methods["evenly_spaced"].get(str(size))),
                   ("best evenly spaced", b.methods["best_evenly_spaced"]),
                   ("greedy", b.methods["greedy"]), ("paper's three", b.methods["paper"])]
        for label, e in entries:
          lines.append(f"| {b.max_loss:g} |" + row(label, e)[1:])
  with open(args.report + ".json", "w") as f:
    json.dump(results, f, indent=1)
  with open(args.report + "_tables.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
