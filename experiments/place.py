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
experiments/reports/PLACEMENT.json and PLACEMENT_tables.md (PLACEMENT.md is
written by hand from them).

`--seeds 1,2` repeats placement over split seeds (the traces stay the same;
only the fit/held-out split changes) and writes a separate report,
experiments/reports/PLACEMENT_SEEDS.md and .json: per cell the mean held-out
speedup over seeds of the placed choice and of each comparison, and in how
many seeds placement was at least as fast. `--reuse PLACEMENT.json` takes the
seeds it holds from there instead of rerunning them; `--resume` keeps what the
seeds report already holds.

  python experiments/place.py [--epochs 8] [--archs vgg11,vgg13,vgg16]
  python experiments/place.py --epochs 10 --seeds 0,1,2 --reuse experiments/reports/PLACEMENT.json
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
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
SEEDS_REPORT = REPORT + "_SEEDS"
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


# (label, key in a budget's methods): the comparisons of the seeds report.
COMPARE = (("all ramps", "all_ramps"), ("greedy", "greedy"),
           ("best evenly spaced", "best_evenly_spaced"), ("paper's three", "paper"))


def brief(e):
  """One method's choice: ramps, held-out speedup and loss, fit loss (None: nothing met the budget)."""
  if e is None:
    return None
  return {"ramps": list(e["active_ramps"]), "speedup": e["test"]["speedup"],
          "loss": 1 - e["test"]["agreement"], "fit_loss": 1 - e["fit"]["agreement"]}


def seed_entry(d, wall, load):
  """The seeds report's record of one `placement_to_dict` result."""
  return {"split": d["split"], "wall_s": wall, "load": load,
          "budgets": [dict({"max_loss": b["max_loss"], "placed": brief(b["placed"])},
                           **{k: brief(b["methods"][k]) for _, k in COMPARE})
                      for b in d["budgets"]]}


def seeds_markdown(out, seeds, archs, costs):
  """PLACEMENT_SEEDS.md: per cell the means over seeds and the counts of seeds
  where placement was at least as fast as each comparison, then every seed."""
  lines = ["# Ramp placement over split seeds (issue 26)", "",
           "The placement of [PLACEMENT.md](PLACEMENT.md) (same cached traces, same `place` "
           "defaults, budgets, block of 4 copies and comparisons) repeated over the seeds of the "
           "fit/held-out split. Per seed, every choice (the subset and lam for placement; lam "
           "for each fixed subset; greedy's additions and prunings; which evenly spaced subset "
           "is best) is made on that seed's fit rows, and the held-out rows give the metrics. "
           "The traces do not change between seeds (one trained network each): this measures "
           "split noise, not training noise.", "",
           f"**Command** ({out['machine']}; written by `experiments/place.py`):", "", "```sh",
           out["command"], "```", ""]
  for note in out["runs"]:
    lines.append(f"- {note}")
  lines += ["", "Wall time of each placement (s; `reused`: read from the file named above):", "",
            "| workload | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---|" * len(seeds)]
  names = [f"{a}/{c}" for a in archs for c in costs if f"{a}/{c}" in out["results"]]
  for name in names:
    runs = out["results"][name]["seeds"]
    cell = lambda s: ("-" if str(s) not in runs else "reused" if runs[str(s)].get("from")
                      else f"{runs[str(s)]['wall_s']:.0f}")
    lines.append(f"| {name} | " + " | ".join(cell(s) for s in seeds) + " |")
  lines += ["", "## Means over seeds (held-out speedup; placed's held-out loss in brackets)", "",
            "`>= X`: in how many seeds placement's held-out speedup was at least X's (of the "
            "seeds where both met the budget on the fit rows); `loss <= budget`: in how many "
            "seeds placement's held-out loss stayed within the budget (not certified: "
            "docs/certify.md).", "",
            "| workload | budget | seeds | placed | " + " | ".join(l for l, _ in COMPARE)
            + " | placed / all ramps (min) | " + " | ".join(f">= {l}" for l, _ in COMPARE)
            + " | loss <= budget |",
            "|---|---|---|---|" + "---|" * (2 * len(COMPARE) + 2)]
  totals = {k: [0, 0] for _, k in COMPARE}
  inside = {k: [0, 0] for _, k in COMPARE}  # comparisons' held-out loss within the budget
  within, cells, per_seed = [0, 0], 0, []
  mean = lambda v: f"{np.mean(v):.2f}x" if v else "-"
  for name in names:
    runs = out["results"][name]["seeds"]
    have = [s for s in seeds if str(s) in runs]
    for i, budget in enumerate(BUDGETS):
      bs = [runs[str(s)]["budgets"][i] for s in have]
      placed = [b["placed"] for b in bs]
      row = [name, f"{budget:.1%}".replace(".0%", "%"), str(len(have)),
             mean([p["speedup"] for p in placed if p]) + " ("
             + (f"{np.mean([p['loss'] for p in placed if p]):.2%}" if any(placed) else "-") + ")"]
      row += [mean([b[k]["speedup"] for b in bs if b[k]]) for _, k in COMPARE]
      ratio = [p["speedup"] / b["all_ramps"]["speedup"] for p, b in zip(placed, bs)
               if p and b["all_ramps"]]
      row.append(f"{np.mean(ratio):.3f} ({min(ratio):.3f})" if ratio else "-")
      for _, k in COMPARE:
        pairs = [(p, b[k]) for p, b in zip(placed, bs) if p and b[k]]
        wins = sum(p["speedup"] >= e["speedup"] for p, e in pairs)
        totals[k][0] += wins
        totals[k][1] += len(pairs)
        row.append(f"{wins}/{len(pairs)}")
        inside[k][0] += sum(b[k] is not None and b[k]["loss"] <= budget for b in bs)
        inside[k][1] += len(bs)
      ok = sum(p is not None and p["loss"] <= budget for p in placed)
      within[0] += ok
      within[1] += len(placed)
      row.append(f"{ok}/{len(placed)}")
      cells += len(placed)
      lines.append("| " + " | ".join(row) + " |")
      for s, b in zip(have, bs):
        show = lambda e: "-" if e is None else f"{e['speedup']:.2f}x"
        p = b["placed"]
        per_seed.append(f"| {name} | {row[1]} | {s} | "
                        + ("-" if p is None else f"**{p['speedup']:.2f}x** ({p['loss']:.2%}, "
                           f"{len(p['ramps'])})") + " | "
                        + " | ".join(show(b[k]) for _, k in COMPARE) + " |")
  lines += ["", "**Totals** over " + f"{cells} seed-cells (workload x budget x seed): "
            + "; ".join(f"placed >= {l} in {totals[k][0]} of {totals[k][1]}" for l, k in COMPARE)
            + f". Held-out loss within the budget: placed in {within[0]} of {within[1]}; "
            + "; ".join(f"{l} in {inside[k][0]} of {inside[k][1]}" for l, k in COMPARE)
            + " (every method's lam is chosen on fit rows against the budget; none is "
            "certified).", "",
            "Mean held-out agreement loss over every workload and seed, per budget:", "",
            "| budget | placed | " + " | ".join(l for l, _ in COMPARE) + " |",
            "|---|---|" + "---|" * len(COMPARE)]
  for i, budget in enumerate(BUDGETS):
    bs = [r["budgets"][i] for n in names for r in out["results"][n]["seeds"].values()]
    loss = lambda k: f"{np.mean([b[k]['loss'] for b in bs if b[k]]):.2%}"
    lines.append(f"| {budget:.1%} | ".replace(".0%", "%") + " | ".join(
        loss(k) for k in ["placed"] + [k for _, k in COMPARE]) + " |")
  lines += ["",
            "## Every seed (held-out speedup; placed: held-out loss, ramps kept)", "",
            "| workload | budget | seed | placed | " + " | ".join(l for l, _ in COMPARE) + " |",
            "|---|---|---|---|" + "---|" * len(COMPARE)] + per_seed
  return "\n".join(lines) + "\n"


def run_seeds(args, seeds):
  """Placement per workload and split seed; writes the seeds report after each run."""
  path = args.seeds_report + ".json"
  out = {"results": {}}
  if args.resume and os.path.exists(path):
    with open(path) as f:
      out = json.load(f)
  out["command"] = "python experiments/place.py " + " ".join(sys.argv[1:])
  out["machine"] = (f"{os.cpu_count()}-core {platform.machine()} CPU, shared with other jobs, "
                    "no GPU")
  out.setdefault("runs", [])
  load = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  out["runs"].append(f"{datetime.date.today()}: seeds {args.seeds} on {args.archs} x "
                     f"{args.costs}; at the start `uptime`: {load()}")
  if args.reuse:
    with open(args.reuse) as f:
      old = json.load(f)
    for name, d in old.items():
      if d["split"]["seed"] in seeds:
        entry = dict(seed_entry(d, d.get("wall_s"), None), **{"from": args.reuse})
        out["results"].setdefault(name, {"seeds": {}})["seeds"][str(d["split"]["seed"])] = entry
    out["runs"].append(f"seeds {sorted(set(seeds) & {d['split']['seed'] for d in old.values()})}"
                       f" read from `{os.path.relpath(args.reuse, ROOT)}` (not rerun)")
  archs, costs = args.archs.split(","), args.costs.split(",")

  def write():
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
    with open(args.seeds_report + ".md", "w") as f:
      f.write(seeds_markdown(out, seeds, archs, costs))

  for arch in archs:
    with open(os.path.join(args.traces, f"digits_{arch}.json")) as f:
      if json.load(f)["epochs"] != args.epochs:  # repeats read the traces; never retrain here
        raise ValueError(f"--epochs: expected the cached traces' epochs for {arch}, got "
                         f"{args.epochs}")
    traces, paper, _ = load_or_make(arch, args.epochs, args.traces)
    for cost in costs:
      name = f"{arch}/{cost}"
      runs = out["results"].setdefault(name, {"seeds": {}})["seeds"]
      for seed in seeds:
        if str(seed) in runs:
          continue
        before = os.getloadavg()[0]
        start = time.perf_counter()
        res = pl.place(traces[cost], list(BUDGETS), block=BLOCK, seed=seed,
                       fixed={"paper": paper})  # defaults
        wall = round(time.perf_counter() - start, 1)
        runs[str(seed)] = seed_entry(report.placement_to_dict(res), wall,
                                     [round(before, 2), round(os.getloadavg()[0], 2)])
        print(report.format_placement(res, f"{name} seed {seed}"), flush=True)
        print(f"{name} seed {seed}: {wall:.1f} s", flush=True)
        write()
  out["runs"].append(f"{datetime.date.today()}: done; at the end `uptime`: {load()}")
  write()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", type=int, default=8)
  ap.add_argument("--archs", default="vgg11,vgg13,vgg16")
  ap.add_argument("--costs", default="flops,latency")
  ap.add_argument("--traces", default=TRACES, help="folder of the recorded traces (cache)")
  ap.add_argument("--report", default=REPORT, help="report path without extension")
  ap.add_argument("--seeds", default="0",
                  help="split seeds, comma-separated; other than 0: the seeds report")
  ap.add_argument("--seeds-report", default=SEEDS_REPORT,
                  help="seeds report path without extension")
  ap.add_argument("--reuse", help="a PLACEMENT.json whose seeds are read, not rerun")
  ap.add_argument("--resume", action="store_true",
                  help="keep the runs the seeds report's .json already holds")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  if seeds != [0] or args.reuse or args.resume:
    return run_seeds(args, seeds)
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
