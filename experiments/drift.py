"""Drift detection on digits: false alarms, detection delay, audited loss, refit.

The digits early-exit VGG-11 (width/4, 3 ramps; trained as `jexit.vgg_traces.make_traces`
trains it, the embedded trace's recipe) serves its held-out images. The held-out
images are split by image into three pools:

  - reference: `--copies` augmented copies of half of them: the trace that
    `jexit export --max-loss 0.03 --delta none --block COPIES` fits the policy
    on and stores as the policy file's reference counts (uncertified: these
    few hundred images cannot certify a small budget by image blocks);
  - stream: a quarter, whose rows (clean, or shifted by noise, blur,
    rotation or contrast at three strengths) are drawn i.i.d. into served
    streams;
  - evaluation: the last quarter, on which the stale and the refitted policies
    are scored under each shift (the live loss and speedup).

Every stream is served by `ExitTable.run` with counters on (the numpy runtime;
`EarlyExitRunner` takes the same decisions and keeps the same counters: checked
on one stream), in batches of `--check-every` inputs, `jexit.monitor.check`
after each batch (alpha 0.01, min effect 0.05). Reported per condition: how
often the verdict is drift (or budget exceeded) at the end of the stream and
ever during it (repeated looks), and the detection delay (inputs until the
verdict first flips) for drift and, per audit rate, for budget exceeded; and
the same with alpha spent over the planned looks (`check(..., look, looks)`:
alpha / looks per check, the "spent" entries).
Refit: one stream per shift served with `--refit-audit`, its audited rows
appended to the reference trace, `jexit refit --delta none`, scored on the
evaluation pool.

    python experiments/drift.py [--streams 100] [--length 3000] [--weights W.pt]
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jexit  # noqa: E402
from jexit import cli, monitor, stats, vgg, vgg_traces  # noqa: E402
from jexit.record import record  # noqa: E402
from jexit.runtime import ExitTable  # noqa: E402
from jexit.runtime_torch import EarlyExitRunner  # noqa: E402

SHIFTS = {
    "noise": (0.1, 0.2, 0.3),       # Gaussian noise sd (pixels in [0, 1])
    "blur": (0.7, 1.2, 2.0),        # Gaussian blur sd (pixels, 32x32 images)
    "rotation": (10, 20, 35),       # degrees
    "contrast": (0.7, 0.5, 0.3),    # x -> m + c (x - m), m the image's mean
}
AUDITS = (0.005, 0.01, 0.05)
ALPHA, MIN_EFFECT, MAX_LOSS = 0.01, 0.05, 0.03


def shift(images: torch.Tensor, kind: str, strength: float, seed: int) -> torch.Tensor:
  g = torch.Generator().manual_seed(seed)
  if kind == "noise":
    return (images + strength * torch.randn(images.shape, generator=g)).clamp(0, 1)
  if kind == "blur":
    r = int(math.ceil(3 * strength))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-t ** 2 / (2 * strength ** 2))
    w = w / w.sum()
    out = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), w.view(1, 1, -1, 1))
  if kind == "rotation":
    a = math.radians(strength) * torch.where(torch.rand(len(images), generator=g) < 0.5,
                                             -1.0, 1.0)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros(len(images))
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)],
                        1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).clamp(0, 1)
  if kind == "contrast":
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    return (m + strength * (images - m)).clamp(0, 1)
  raise ValueError(f"shift: unknown kind {kind!r}")


def serve_stream(policy, rows, rng, length, every, audits, reference):
  """One stream of `length` rows drawn from `rows` = (conf, pred): the first
  check index (in inputs) where drift was found, per audit rate the first
  where the budget was exceeded, and the verdicts at the end."""
  conf, pred = rows
  idx = rng.integers(0, len(conf), length)
  seed = int(rng.integers(1 << 31))
  tables = [ExitTable.load(policy, out_of_range="clip", counters=True, audit=a, seed=seed + i)
            for i, a in enumerate(audits)]
  drift_at, exceeded_at = None, [None] * len(audits)
  # the same checks with alpha spent over the planned looks (check's look/looks)
  looks = -(-length // every)
  spent_drift_at, spent_exceeded_at = None, [None] * len(audits)
  level = monitor.spent_alpha(ALPHA, 1, looks)
  for look, lo in enumerate(range(0, length, every), start=1):
    batch = idx[lo:lo + every]
    for t in tables:
      t.run(conf[batch], pred[batch])
    served = lo + len(batch)
    c = tables[0].counters
    if drift_at is None:
      report = monitor.check(reference, c, alpha=ALPHA, min_effect=MIN_EFFECT)
      if report.drifted or report.stops.drift:
        drift_at = served
    if spent_drift_at is None:
      report = monitor.check(reference, c, alpha=ALPHA, min_effect=MIN_EFFECT, look=look,
                             looks=looks)
      if report.drifted or report.stops.drift:
        spent_drift_at = served
    for i, t in enumerate(tables):
      d = t.counters.audited - t.counters.audit_agree
      for at, a in ((exceeded_at, ALPHA), (spent_exceeded_at, level)):
        if at[i] is None and stats.clopper_pearson(d, t.counters.audited, a)[0] > MAX_LOSS:
          at[i] = served
  final = monitor.check(reference, tables[0].counters, alpha=ALPHA, min_effect=MIN_EFFECT)
  return drift_at, exceeded_at, final, tables, spent_drift_at, spent_exceeded_at


def stale_metrics(policy, rows):
  """(disagreement with the final ramp, speedup) of a policy on rows."""
  conf, pred, cost = rows
  t = ExitTable.load(policy, out_of_range="clip")
  stop, _, out = t.run(conf, pred)
  mean = np.cumsum(cost)[stop].mean()
  return float(np.mean(out != pred[:, -1])), float(cost.sum() / mean)


def summarize(delays, length):
  found = [d for d in delays if d is not None]
  if not found:
    return f"not within {length}"
  med = np.median([d if d is not None else np.inf for d in delays])
  med = "n/a" if not np.isfinite(med) else f"{int(med)}"
  return f"{med} ({len(found)}/{len(delays)})"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--weights", help="EarlyExitVGG state dict (else trained, 10 epochs)")
  p.add_argument("--save-weights", dest="save_weights")
  p.add_argument("--streams", type=int, default=60, help="in-distribution streams")
  p.add_argument("--shift-streams", type=int, default=10, dest="shift_streams")
  p.add_argument("--length", type=int, default=3000, help="inputs per stream")
  p.add_argument("--check-every", type=int, default=250, dest="check_every")
  p.add_argument("--copies", type=int, default=8,
                 help="augmented copies per reference image")
  p.add_argument("--pool-copies", type=int, default=4, dest="pool_copies",
                 help="augmented copies per stream/evaluation image")
  p.add_argument("--refit-audit", type=float, default=0.2, dest="refit_audit")
  p.add_argument("--refit-copies", type=int, default=16, dest="refit_copies",
                 help="augmented copies per stream image served once for the refit")
  p.add_argument("--out", default="experiments/reports/drift.json")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  torch.set_num_threads(2)
  t0 = time.perf_counter()
  config = vgg_traces.TraceConfig(epochs=0 if args.weights else 10, seed=args.seed)
  data = vgg_traces.load_digits_images(config.size)
  n = len(data.images)
  train_rows, held = vgg_traces.split_rows(n, config.trace_frac, config.seed)
  model = vgg.build_model("vgg11", 3, width_div=config.width_div, num_classes=10,
                          head_pool=config.head_pool)
  if args.weights:
    vgg.load_weights(model, args.weights)
  else:
    torch.manual_seed(config.seed)
    index = torch.as_tensor(train_rows)
    vgg_traces.train(model, data.images[index], data.labels[index], epochs=config.epochs,
              batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    if args.save_weights:
      torch.save(model.state_dict(), args.save_weights)
  model.eval()
  train_s = time.perf_counter() - t0
  perm = np.random.default_rng(args.seed + 7).permutation(held)
  half, three = len(perm) // 2, 3 * len(perm) // 4
  pools = [np.sort(q) for q in (perm[:half], perm[half:three], perm[three:])]

  def rows_of(pool, kind=None, strength=None, salt=0, copies=None):
    copies = copies or (args.copies if salt == 1 else args.pool_copies)
    x, y, _ = vgg_traces.trace_inputs(data, pool, copies, args.seed + salt)
    if kind is not None:
      x = shift(x, kind, strength, args.seed + 1000 + salt)
    tr = record(model.segments, model.heads, (x, y), batch_size=256, device="cpu",
                progress=False)
    return tr, x

  tmp = tempfile.mkdtemp()
  ref_trace, _ = rows_of(pools[0], salt=1)
  jexit.save_traces(os.path.join(tmp, "ref.npz"), ref_trace)
  policy = os.path.join(tmp, "policy.npz")
  cli.main(["export", os.path.join(tmp, "ref.npz"), "--max-loss", str(MAX_LOSS),
            "--block", str(args.copies), "--delta", "none", "--out", policy])
  table = ExitTable.load(policy)
  occ, stops, nref = table.reference
  reference = monitor.Reference(occ, stops, nref, MAX_LOSS, table.certificate)

  conditions = [("none", 0)] + [(k, s) for k, ss in SHIFTS.items() for s in ss]
  results = {"alpha": ALPHA, "min_effect": MIN_EFFECT, "max_loss": MAX_LOSS,
             "length": args.length, "check_every": args.check_every,
             "reference_rows": int(nref), "copies": args.copies,
             "pool_copies": args.pool_copies, "streams": args.streams,
             "shift_streams": args.shift_streams, "conditions": []}
  rng = np.random.default_rng(args.seed + 11)
  runner_checked = False
  for kind, strength in conditions:
    salt = 2
    stream_tr, stream_x = rows_of(pools[1], None if kind == "none" else kind, strength, salt)
    eval_tr, _ = rows_of(pools[2], None if kind == "none" else kind, strength, salt + 1)
    if not runner_checked:  # the torch runner keeps the same counters as ExitTable
      runner = EarlyExitRunner(list(model.segments), list(model.heads),
                               ExitTable.load(policy, out_of_range="clip"), counters=True)
      runner(stream_x)
      np_table = ExitTable.load(policy, out_of_range="clip", counters=True)
      np_table.run(stream_tr.conf, stream_tr.pred)
      runner_checked = runner.counters == np_table.counters
      results["runner_counters_equal"] = bool(runner_checked)
    live_loss, live_speedup = stale_metrics(policy, (eval_tr.conf, eval_tr.pred, eval_tr.cost))
    r = args.streams if kind == "none" else args.shift_streams
    drift, exceeded, end_drift, end_any, sdrift, sexceeded = [], [], 0, 0, [], []
    for _ in range(r):
      d, e, final, _, sd, se = serve_stream(policy, (stream_tr.conf, stream_tr.pred), rng,
                                            args.length, args.check_every, AUDITS, reference)
      drift.append(d)
      exceeded.append(e)
      sdrift.append(sd)
      sexceeded.append(se)
      end_drift += final.verdict == "drift" or bool(final.drifted)
      end_any += final.verdict != "ok"
    ever_of = lambda ds, es: sum(d is not None or any(x is not None for x in e)
                                 for d, e in zip(ds, es))
    ever, ever_spent = ever_of(drift, exceeded), ever_of(sdrift, sexceeded)
    ever_drift = sum(d is not None for d in drift)
    ever_drift_spent = sum(d is not None for d in sdrift)
    row = {"shift": kind, "strength": strength, "streams": r,
           "live_loss": live_loss, "live_speedup": live_speedup,
           "end_drift": end_drift / r, "end_alarm": end_any / r, "ever_alarm": ever / r,
           "drift_delay": summarize(drift, args.length),
           "exceeded_delay": {str(a): summarize([e[i] for e in exceeded], args.length)
                              for i, a in enumerate(AUDITS)},
           "ever_drift": ever_drift / r,
           "spent": {"ever_alarm": ever_spent / r, "ever_drift": ever_drift_spent / r,
                     "drift_delay": summarize(sdrift, args.length),
                     "exceeded_delay": {str(a): summarize([e[i] for e in sexceeded],
                                                          args.length)
                                        for i, a in enumerate(AUDITS)}},
           "stream_rows": int(stream_tr.num_inputs), "eval_rows": int(eval_tr.num_inputs)}
    print(json.dumps(row), flush=True)
    results["conditions"].append(row)

  # refit on audited rows, per shift at its middle strength (and the strongest noise)
  refits = []
  for kind, strength in [(k, ss[-1]) for k, ss in SHIFTS.items()]:
    stream_tr, _ = rows_of(pools[1], kind, strength, 4, copies=args.refit_copies)
    eval_tr, _ = rows_of(pools[2], kind, strength, 3)
    t = ExitTable.load(policy, out_of_range="clip", counters=True, audit=args.refit_audit,
                       seed=5)
    perm = rng.permutation(stream_tr.num_inputs)  # each stream row served once
    t.run(stream_tr.conf[perm], stream_tr.pred[perm])
    live = os.path.join(tmp, "live.npz")
    t.counters.save(live)
    stale = stale_metrics(policy, (eval_tr.conf, eval_tr.pred, eval_tr.cost))
    row = {"shift": kind, "strength": strength, "served": int(stream_tr.num_inputs),
           "audited": int(t.counters.audited), "stale_loss": stale[0],
           "stale_speedup": stale[1]}
    for name, extra in (("alone", []), ("with_trace", ["--trace", os.path.join(tmp, "ref.npz")])):
      new = os.path.join(tmp, f"refit-{kind}-{name}.npz")
      rc = cli.main(["refit", policy, live, *extra, "--delta", "none", "--out", new])
      fresh = stale_metrics(new, (eval_tr.conf, eval_tr.pred, eval_tr.cost)) if rc == 0 else None
      row[f"refit_{name}_loss"] = None if fresh is None else fresh[0]
      row[f"refit_{name}_speedup"] = None if fresh is None else fresh[1]
    print(json.dumps(row), flush=True)
    refits.append(row)
  results["refit"] = refits
  results["seconds"] = time.perf_counter() - t0
  results["train_seconds"] = train_s
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  print(f"done in {results['seconds']:.0f} s (training {train_s:.0f} s); wrote {args.out}")


if __name__ == "__main__":
  main()
