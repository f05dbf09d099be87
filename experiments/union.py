"""Recall or a baseline, whichever is faster on the fit rows (a lever of issue 7).

Per fold and target, the default recall policy and the baselines in
`--pool` each choose their parameter on the fit rows as usual (most fit
speedup within the target); the union then keeps the member whose chosen
parameter has the most fit speedup and is scored on the held-out fold.
Same protocol, workloads and scoreboard as experiments/quality.py. The last
default pool (recall, no recall, Apparate greedy, global threshold) is the rule
of `jexit budget`'s "best" line (`jexit.select.best_method`), with the
signal fixed to `1 - conf`.

The last column, `budget default`, is the whole rule of `jexit budget` with
its defaults: per fold, the exit signal of the solver's model (`1 - conf`, or
the traces' signal where they record one, or `stability`) is chosen on the fit rows by an inner cross-fitting
(`--inner-folds`, as `jexit.select.choose_family`), then recall and no
recall on that signal, Apparate greedy and the global threshold compete by
fit speedup (`best_method`, ties in `DEPLOYABLE` order).

Usage:
  python experiments/union.py [--folds 5] [--num-lambdas 300] [--inner-folds 4]
      [--pool apparate_greedy,global_threshold] [--trace-dir experiments/traces/pool2]
      [--signal-as-conf]
  python experiments/union.py --seeds 0,1,2,3,4   # repeated outer splits
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jexit import protocol, select  # pylint: disable=wrong-import-position
from jexit import traces as jt  # pylint: disable=wrong-import-position
from experiments import quality, workloads  # pylint: disable=wrong-import-position


def signals_of(traces):
  """The candidate exit signals of `jexit budget`'s default
  (`jexit.select.auto_signals`): the traces' own (`traces.signal`, else
  `1 - conf`), stability and class."""
  return select.auto_signals(traces)


def union_per_fold(fr, members, target):
  """Held-out speedup per fold of the member with the most fit speedup, and
  how often each member was picked.

  `fr`: a Frontier, or a list of per-fold `{member: (fit, test)}` dicts;
  `members` None: every member of each fold's dict.
  """
  return _scored(fr if isinstance(fr, list) else fr.splits, members, target)[:2]


def _scored(splits, members, target):
  """(held-out speedup per fold, picks, pooled held-out agreement) of the
  member with the most fit speedup per fold (the backbone when none meets
  the target on the fit rows)."""
  speed, picked, agree, rows = [], dict.fromkeys(members or (), 0), 0.0, 0
  for split in splits:
    best = (-np.inf, 1.0, 1.0, None)  # (fit speedup, held-out speedup, agreement, member)
    for m in members or split:
      fit_ev, test_ev = split[m]
      i = select.choose_index(fit_ev, target)
      if i is not None and float(fit_ev.speedup[i]) > best[0]:
        best = (float(fit_ev.speedup[i]), float(test_ev.speedup[i]),
                float(test_ev.agreement[i]), m)
    speed.append(best[1])
    n = next(iter(split.values()))[1].num_inputs
    agree, rows = agree + best[2] * n, rows + n
    if best[3] is not None:
      picked[best[3]] = picked.get(best[3], 0) + 1
  return np.array(speed), picked, agree / rows


def inner_choices(traces, folds, inner_folds, block, num_lambdas, seed=0):
  """Per outer fold, target -> (signal, (signal, member)) chosen on the fold's
  fit rows by an inner cross-fitting: the signal as `choose_family` picks it
  (mean inner held-out speedup of recall; ties: the traces' own), and the
  (signal, deployable member) pair with the most mean inner held-out speedup
  (ties: the traces' own, then `DEPLOYABLE` order)."""
  signals = signals_of(traces)
  pairs = [(sig, m) for sig in signals for m in select.DEPLOYABLE
           if sig == signals[0] or m in ("recall", "norecall")]
  out = []
  for fit_rows, _ in jt.fold_rows(traces.num_inputs, folds, seed=seed, block=block):
    inner = {sig: protocol.frontier(traces.take(fit_rows), folds=inner_folds, block=block,
                              methods=tuple(m for s, m in pairs if s == sig),
                              num_lambdas=num_lambdas,
                              fit_options={**protocol.DEFAULT_FIT, "signal": sig})
             for sig in signals}
    choice = {}
    for t in quality.TARGETS:
      score = {(sig, m): quality.per_fold(inner[sig], m, t)[0].mean() for sig, m in pairs}
      signal = max(signals, key=lambda sig: (score[sig, "recall"], -signals.index(sig)))
      choice[t] = signal, max(pairs, key=lambda p: (score[p], -pairs.index(p)))
    out.append(choice)
  return out


def _signal_split(fr, others, signal, i):
  """Fold i's `{member: (fit, test)}` of recall/no recall on `signal`: from
  `fr` (the traces' own signal) or from `others[signal]`."""
  return others[signal].splits[i] if signal in others else fr.splits[i]


def budget_default_splits(fr, others, choices, target):
  """Per fold `{member: (fit, test)}`: recall and no recall from the frontier
  of the fold's chosen signal, the threshold rules (on conf) from `fr`."""
  out = []
  for i, split in enumerate(fr.splits):
    own = _signal_split(fr, others, choices[i][target][0], i)
    out.append({m: own[m] if m in ("recall", "norecall") else split[m] for m in select.DEPLOYABLE})
  return out


def _frontiers(traces, folds, inner_folds, block, num_lambdas, seed=0):
  """The outer split's frontiers: recall and no recall on the traces' own
  signal and the external baselines on conf (`fr`); recall and no recall on
  each other candidate signal (`{signal: frontier}`); the inner choices."""
  kw = dict(folds=folds, block=block, num_lambdas=num_lambdas, seed=seed)
  fr = protocol.frontier(traces, methods=("recall", "norecall") + quality.EXTERNAL, **kw)
  others = {sig: protocol.frontier(traces, methods=("recall", "norecall"),
                             fit_options={**protocol.DEFAULT_FIT, "signal": sig}, **kw)
            for sig in signals_of(traces)[1:]}
  return fr, others, inner_choices(traces, folds, inner_folds, block, num_lambdas, seed)


def budget_vs_external(traces, folds, inner_folds, block, num_lambdas, seed):
  """target -> (held-out speedup per fold of `budget default`, {external
  baseline: held-out speedup per fold}) on the outer split of `seed`."""
  fr, others, choices = _frontiers(traces, folds, inner_folds, block, num_lambdas, seed)
  return {t: (_scored(budget_default_splits(fr, others, choices, t), select.DEPLOYABLE, t)[0],
              {m: quality.per_fold(fr, m, t)[0] for m in quality.EXTERNAL})
          for t in quality.TARGETS}


def repeated(seeds, folds, inner_folds, num_lambdas, trace_dir=None, signal_as_conf=False):
  """`budget default` against the best external baseline on the outer splits
  of several seeds (repeated cross-fitting): cells won per seed, and per cell
  the mean over seeds x folds."""
  runs = {}  # (workload, target) -> [(mine, {baseline: speeds}) per seed]
  for name, traces in workloads.suite(trace_dir, signal_as_conf).items():
    block = 4 if name.startswith("digits") else 1
    start = time.perf_counter()
    for seed in seeds:
      for t, r in budget_vs_external(traces, folds, inner_folds, block, num_lambdas,
                                     seed).items():
        runs.setdefault((name, t), []).append(r)
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
  print("\ncells (of 32) where budget default is at least as fast as the best external "
        "baseline, per outer split seed:")
  for s, seed in enumerate(seeds):
    won = sum(r[s][0].mean() >= max(v.mean() for v in r[s][1].values()) - 1e-9
              for r in runs.values())
    lost = [f"{w} {t * 100:g}%" for (w, t), r in runs.items()
            if r[s][0].mean() < max(v.mean() for v in r[s][1].values()) - 1e-9]
    print(f"  seed {seed}: {won}" + (f" (lost: {', '.join(lost)})" if lost else ""))
  print(f"\nheld-out speedup, mean over {len(seeds)} seeds x {folds} folds: budget default "
        "vs the best external baseline (by that mean); Δ: budget default minus that baseline, "
        "mean ± std over the seeds' fold means\n")
  print("| workload | " + " | ".join(f"loss <= {t * 100:g}%" for t in quality.TARGETS) + " |")
  print("|---|" + "---|" * len(quality.TARGETS))
  won = 0
  for w in dict.fromkeys(k[0] for k in runs):
    cells = []
    for t in quality.TARGETS:
      r = runs[w, t]
      mine = np.array([m.mean() for m, _ in r])
      theirs = {b: np.array([d[b].mean() for _, d in r]) for b in quality.EXTERNAL}
      best = max(quality.EXTERNAL, key=lambda b: theirs[b].mean())
      delta = mine - theirs[best]
      ok = mine.mean() >= theirs[best].mean() - 1e-9
      won += ok
      cells.append(f"{mine.mean():.3f}x vs {theirs[best].mean():.3f}x {best}, "
                   f"Δ {delta.mean():+.3f} ±{delta.std():.3f}" + ("" if ok else " **LOSS**"))
    print(f"| {w} | " + " | ".join(cells) + " |")
  print(f"\nat least as fast as the best external baseline, mean over seeds: {won} of {len(runs)}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--num-lambdas", type=int, default=300)
  parser.add_argument("--inner-folds", type=int, default=select.INNER_FOLDS)
  parser.add_argument("--pool", default="apparate_greedy;apparate_greedy,global_threshold;"
                                        "norecall,apparate_greedy,global_threshold",
                      help="';'-separated pools of baselines to join with recall")
  parser.add_argument("--seeds", default=None,
                      help="comma-separated outer split seeds: run only budget default "
                           "against the external baselines, repeated over these splits")
  parser.add_argument("--trace-dir", default=None,
                      help="folder of the digits traces (default experiments/traces/pool2)")
  parser.add_argument("--signal-as-conf", action="store_true",
                      help="digits traces' conf := 1 - their signal (e.g. the margin), so "
                           "the threshold baselines read it too")
  args = parser.parse_args(argv)
  if args.seeds:
    repeated([int(s) for s in args.seeds.split(",")], args.folds, args.inner_folds,
             args.num_lambdas, args.trace_dir, args.signal_as_conf)
    return
  pools = [tuple(p.split(",")) for p in args.pool.split(";")]
  names = ["default"] + ["recall+" + "+".join(p) for p in pools] + ["budget default", "inner member"]
  picks = {n: {} for n in names[1:]}
  chosen = {}  # signal -> folds x targets where budget default picked it
  detail = []  # budget default vs the best external baseline, cell by cell
  board = quality.Scoreboard(names)
  for name, traces in workloads.suite(args.trace_dir, args.signal_as_conf).items():
    block = 4 if name.startswith("digits") else 1
    start = time.perf_counter()
    fr, others, choices = _frontiers(traces, args.folds, args.inner_folds, block,
                                     args.num_lambdas)
    cells = []
    for t in quality.TARGETS:
      speed = {"default": quality.per_fold(fr, "recall", t)[0]}
      runs = [(fr, ("recall",) + pool) for pool in pools]
      runs.append((budget_default_splits(fr, others, choices, t), select.DEPLOYABLE))
      inner = []
      for i in range(len(fr.splits)):
        sig, m = choices[i][t][1]
        inner.append({f"{sig} {m}": _signal_split(fr, others, sig, i)[m]})
      runs.append((inner, None))
      for c in choices:
        chosen[c[t][0]] = chosen.get(c[t][0], 0) + 1
      for n, (source, members) in zip(names[1:], runs):
        speed[n], picked = union_per_fold(source, members, t)
        for m, c in picked.items():
          picks[n][m] = picks[n].get(m, 0) + c
      rival = max(quality.per_fold(fr, m, t)[0].mean() for m in quality.EXTERNAL)
      cells.append(board.cell(speed, rival))
      mine, _, agree = _scored(runs[len(pools)][0], select.DEPLOYABLE, t)
      best = max(quality.EXTERNAL, key=lambda m: quality.per_fold(fr, m, t)[0].mean())
      theirs, their_agree = quality.per_fold(fr, best, t)
      detail.append((name, t, mine, agree, best, theirs, their_agree))
    board.row(name, cells, start)
  board.summary(noise=False,
                notes={n: f"; picked (folds x targets): {picks[n]}" for n in names[1:]})
  print(f"budget default: signal chosen on the fit rows, folds x targets: {chosen}")
  print("\nbudget default vs the best external baseline: held-out speedup, mean over folds "
        "± std across folds (pooled held-out agreement)\n")
  print("| workload | " + " | ".join(f"loss <= {t * 100:g}%" for t in quality.TARGETS) + " |")
  print("|---|" + "---|" * len(quality.TARGETS))
  for w in dict.fromkeys(d[0] for d in detail):
    cells = []
    for _, _, mine, agree, best, theirs, their_agree in (d for d in detail if d[0] == w):
      verdict = "" if mine.mean() >= theirs.mean() - 1e-9 else " **LOSS**"
      cells.append(f"{mine.mean():.2f}x ±{mine.std():.2f} ({agree * 100:.1f}%) vs "
                   f"{theirs.mean():.2f}x ±{theirs.std():.2f} ({their_agree * 100:.1f}%) "
                   f"{best}{verdict}")
    print(f"| {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
