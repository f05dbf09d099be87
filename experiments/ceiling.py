"""What the ramps' signals allow at all: in-sample ceilings (issue 7, "2x at <= 1% loss").

On the digits traces the hindsight oracle (each input stops at the first ramp
that agrees with the final one) allows 2.1x-4.8x at <= 1% agreement loss. The
oracle reads the answer; a policy reads only the ramps' confidence and
prediction. This script asks how much of the gap a policy family could close
even if it were fitted, and its parameter chosen, on the very rows it is
scored on (in-sample, all rows): an upper bound on what that family can do
held-out on these traces, up to luck.

Families (each fitted and chosen on all rows of a workload, then scored there):
- recall / no recall: jexit's default model with 16, 32, 64 or 128 quantile
  bins (the candidates pooled), on `1 - conf`, on the stability signal and
  (recall) on the class signal (`jexit.fit(..., signal="class")`, scored on
  its cross-fitted class scores as `jexit.protocol.frontier` scores fit rows);
- Apparate greedy and the global threshold, as jexit runs them;
- per-ramp thresholds by exhaustive search: every combination of thresholds
  on the first K-2 ramps from a grid of per-ramp quantiles of `1 - conf`
  (plus never and always; as many per ramp as keep the combinations within
  `--max-combos`: every distinct value with 3 ramps, 27 per ramp with 5), and
  for ramp K-1 every cut between distinct values (`ramp_threshold_ceiling`).
  With 3 ramps this is the exact in-sample optimum of the family that
  Apparate's greedy search and the global threshold belong to; with 5, a
  lower bound of it;
- learned exit scores: per ramp k < K, a gradient-boosted classifier
  (scikit-learn's HistGradientBoostingClassifier) of "ramp k agrees with the
  final ramp" from everything seen up to ramp k (conf and log(1 - conf) of
  ramps 1..k, which earlier predictions equal ramp k's, and how many), its
  probabilities cross-fitted (5 folds, blocked as quality.py: no row is scored
  by a classifier that saw it), then per-ramp thresholds on those scores by the
  same exhaustive search, in-sample. A richer signal than any single ramp's
  confidence; still no oracle knowledge. "+ class" adds the one-hot predicted
  class of ramps 1..k to the features;
- with traces that record their own `signal` (experiments/traces/margin: the
  margin), the recall policy and the exhaustive per-ramp thresholds on it;
- patience, and the hindsight oracle.

Usage:
  python experiments/ceiling.py [--max-combos 20000] [--num-lambdas 600]
      [--out experiments/reports/CEILING.md] [--trace-dir experiments/traces/pool2]
"""

import argparse
import itertools
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jexit  # pylint: disable=wrong-import-position
from jexit import baselines  # pylint: disable=wrong-import-position
from jexit import protocol, select  # pylint: disable=wrong-import-position
from jexit import traces as jt  # pylint: disable=wrong-import-position
from jexit.fit import cross_fitted_class_signal  # pylint: disable=wrong-import-position
from experiments import quality, workloads  # pylint: disable=wrong-import-position

TARGETS = quality.TARGETS
BINS = (16, 32, 64, 128)
METHODS = ("recall", "norecall", "recall [stability]", "recall [class]", "global_threshold",
           "apparate_greedy", "per-ramp thresholds (exhaustive)", "learned scores (exhaustive)",
           "learned scores + class (exhaustive)", "patience", "oracle")
FOLDS = 5


def ramp_threshold_ceiling(traces, targets, grid):
  """target -> most speedup of any per-ramp threshold rule with agreement loss <= target.

  The rule stops at the first ramp k < K with `1 - conf_k < t_k` (else at the
  last) and answers that ramp's prediction. Thresholds of ramps 1..K-2 run
  over `grid` per-ramp quantiles of `1 - conf` plus 0 (never stop) and inf
  (always stop); for ramp K-1 every cut between distinct values is tried, by
  sorting the rows that reach it. Exhaustive over that grid, on the rows given.
  """
  u = 1.0 - np.asarray(traces.conf, np.float64)
  n, k = u.shape
  agree = (traces.pred == traces.pred[:, -1:]).astype(np.float64)
  spent = np.cumsum(traces.cost)
  grids = [np.unique(np.concatenate([[0.0, np.inf], np.quantile(u[:, j], np.linspace(0, 1, grid))]))
           for j in range(k - 2)]
  best = {t: 1.0 for t in targets}  # the backbone meets every target
  for combo in itertools.product(*grids):
    stop = np.full(n, -1)
    for j, t in enumerate(combo):
      stop[(stop < 0) & (u[:, j] < t)] = j
    early = stop >= 0
    agree_early = agree[early, stop[early]].sum()
    cost_early = spent[stop[early]].sum()
    rest = np.flatnonzero(~early)
    # Rows reaching ramp K-1, most confident first: stopping the first c of them
    # there is a threshold rule only at cuts between distinct values.
    order = rest[np.argsort(u[rest, k - 2], kind="stable")]
    ur = u[order, k - 2]
    cuts = np.concatenate([[0], np.flatnonzero(ur[1:] > ur[:-1]) + 1, [len(order)]])
    a_stop = np.concatenate([[0.0], np.cumsum(agree[order, k - 2])])[cuts]
    a_go = agree[order, k - 1].sum() - np.concatenate([[0.0], np.cumsum(agree[order, k - 1])])[cuts]
    agreement = (agree_early + a_stop + a_go) / n
    mean_cost = (cost_early + cuts * spent[k - 2] + (len(order) - cuts) * spent[k - 1]) / n
    speed = spent[-1] / mean_cost
    for t in targets:
      ok = agreement >= 1.0 - t - 1e-12
      if ok.any():
        best[t] = max(best[t], float(speed[ok].max()))
  return best


FINDINGS = """## Findings

These are about experiments/traces/pool2, the first suite. Issue 7's benchmark suite is now
experiments/traces/pool4_s1 (4x4 ramp heads; experiments/reports/CONFIRM.md), whose ceilings are in
experiments/reports/CEILING_POOL4_S1.md.

- **The predicted class is what reaches 2x at <= 1% on four of the six digits workloads.**
  The in-sample best at 1% is 2.21x, 2.15x, 1.75x, 1.74x, 2.02x and 2.04x (VGG-11/3, VGG-11/5,
  VGG-13/3, VGG-13/5, VGG-16/3 and VGG-16/5 ramps). It comes from the recall policy on the
  class signal (`jexit.fit(..., signal="class")`, experiments/reports/CLASS.md) or from gradient-boosted
  exit scores that also read the predicted classes. Without the class, the best family reached
  1.86x, 1.92x, 1.71x, 1.61x, 1.90x and 1.80x, so no family reached 2x.
- **VGG-13 stays below 2x even in-sample** (1.75x and 1.74x), although the hindsight oracle
  allows 2.10x and 2.89x. The oracle knows which inputs the early ramps get right; on VGG-13,
  no family here can read that from the ramps' confidences, predictions and classes.
- **jexit's default rule is at that ceiling held-out.** At 1% loss, `jexit budget`'s default
  rule (experiments/reports/UNION.md, 5-fold held-out) reaches 2.14x, 2.16x, 1.74x, 1.72x, 2.04x and
  2.03x. That is within 0.07x of the in-sample best on every digits workload.
- **The simple calibration gets nearly all of what boosting gets.** The recall policy on the
  class signal (a logistic fit per ramp: class, class x log(1 - conf), log(1 - conf), agreement
  with the previous ramp) is within 0.06x of the boosted scores with classes at 1%, and ahead
  of them on VGG-13/5 and VGG-16/5 ramps (1.74x vs 1.69x, 2.04x vs 1.98x). Nothing in the
  boosted rows is held-out for the thresholds; jexit ships the class signal, not boosting.
- **Exhaustive per-ramp thresholds gain little over Apparate's greedy search** (in-sample, at
  most +0.02x at 1% on the 3-ramp traces, where the search is exact). The in-sample recall
  policy is within 0.03x of them at 1% on every digits trace but VGG-11/3 ramps (1.80x vs
  1.85x).
- **A richer signal without the class gains a little on some traces and loses on others.**
  Learned exit scores (gradient boosting on every conf and prediction seen so far, but not the
  class ids) beat the best confidence family in-sample on VGG-11/5 ramps (+0.10x at 1%) and
  VGG-16/5 ramps (+0.02x), and lose on VGG-13/3 ramps (-0.05x) and VGG-16/3 ramps (-0.04x).
- **On the synthetic workloads, 2x at 1% is met held-out with the stability signal.** It
  reaches 2.08x and 2.15x in-sample at 1% (2.19x with boosted scores on synth-overthink), and
  `jexit budget`'s default rule 2.07x and 2.18x held-out (experiments/reports/UNION.md).
- The last three findings were measured before the class families existed: their ceilings
  and held-out numbers are for the families without the predicted class.
- **Self-distilled ramps do not move the ceiling either.** Ramps trained to match the final
  head's softened output (`make_traces.py --ramp-target teacher`, T = 2; the backbone and the
  final head are the same as with labels) agree with the final ramp slightly less often on
  the held-out images (ramp 1 of VGG-11/3 ramps: 69.7% against 72.8%), and the in-sample best
  at 1% is 1.80x, 1.92x, 1.68x, 1.62x, 1.90x and 1.72x on the six digits workloads (labels:
  1.86x, 1.92x, 1.71x, 1.61x, 1.90x, 1.80x): still no 2x
  (`python experiments/ceiling.py --trace-dir experiments/traces/distill`, 2 min). On these
  images the final head of VGG-11/3 ramps is right on all 1,078 training images (un-augmented;
  mean top probability 0.94 at T = 2), so its soft output teaches little that the labels do
  not.
- **The margin moves it a little.** The same traces with each ramp's margin recorded
  (`make_traces.py --signal margin`; conf and predictions unchanged) reach an in-sample best
  at 1% of 1.92x, 1.92x, 1.76x, 1.66x, 2.00x and 1.85x (experiments/reports/CEILING_MARGIN.md), and
  `jexit budget`'s default rule 1.66x-1.99x held-out (experiments/reports/MARGIN.md). Entropy instead
  of the margin loses 0.1-0.2x.
- **Jointly trained ramps do move it.** The same six networks with the backbone and every
  head trained together (`make_traces.py --training joint`; same costs and trace rows) reach
  an in-sample best at 1% of 2.60x, 2.44x, 2.08x, 2.09x, 2.69x and 2.57x
  (experiments/reports/CEILING_JOINT.md), and `jexit budget`'s default rule 2.08x-2.67x held-out
  (experiments/reports/JOINT.md). Without the class, what limited the suite above was its ramps,
  not the policy.
"""


def history_features(traces, k, classes=False):
  """`[N, F]`: what a policy has seen at ramp k (0-based): conf and log(1 - conf)
  of ramps 0..k, which earlier predictions equal ramp k's, and how many do;
  with `classes`, also the one-hot predicted class of ramps 0..k."""
  conf = np.asarray(traces.conf[:, :k + 1], np.float64)
  same = (traces.pred[:, :k + 1] == traces.pred[:, k:k + 1]).astype(np.float64)
  parts = [conf, np.log(np.maximum(1.0 - conf, 1e-9)), same, same.sum(axis=1, keepdims=True)]
  if classes:
    num = int(traces.pred.max()) + 1
    parts += [(traces.pred[:, j:j + 1] == np.arange(num)).astype(np.float64)
              for j in range(k + 1)]
  return np.concatenate(parts, axis=1)


def learned_scores(traces, block, seed=0, classes=False):
  """Traces whose conf at ramps < K is a cross-fitted P(ramp k agrees with the final one)."""
  from sklearn.ensemble import HistGradientBoostingClassifier  # pylint: disable=import-outside-toplevel
  score = np.array(traces.conf, np.float64)
  for fit_rows, test_rows in jt.fold_rows(traces.num_inputs, FOLDS, seed=seed, block=block):
    for k in range(traces.num_ramps - 1):
      x = history_features(traces, k, classes)
      y = (traces.pred[:, k] == traces.pred[:, -1]).astype(int)
      if y[fit_rows].min() == y[fit_rows].max():  # one class: nothing to learn
        score[test_rows, k] = y[fit_rows][0]
        continue
      clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
      clf.fit(x[fit_rows], y[fit_rows])
      score[test_rows, k] = clf.predict_proba(x[test_rows])[:, 1]
  return traces._replace(conf=np.clip(score, 0.0, 1.0))


def in_sample(traces, num_lambdas, max_combos, block):
  """method -> target -> in-sample speedup (most speedup within the target)."""
  rows = np.arange(traces.num_inputs)
  evals = {}
  signals = (("1-conf", ("recall", "norecall")), ("stability", ("recall",)),
             ("class", ("recall",)))
  if traces.signal is not None:  # the trace's own signal (margin, entropy, ...)
    signals += (("signal", ("recall",)),)
  for signal, names in signals:
    opts = protocol.merged_fit_options({"signal": signal, "num_bins": BINS})
    fit_signal = None
    if signal == "class":  # scored, as frontier does, on cross-fitted class scores
      opts["class_block"] = block
      fit_signal = cross_fitted_class_signal(traces, block=block)
    candidates = protocol.fit_candidates(traces, rows, opts)
    lambdas = protocol.default_lambdas(candidates[0][0], num_lambdas)
    methods = names + (("global_threshold", "apparate_greedy", "patience", "oracle")
                       if signal == "1-conf" else ())
    res, _, _ = protocol._run_split(  # pylint: disable=protected-access
        traces, rows, rows, candidates=candidates, markov_candidates=candidates,
        lambdas=lambdas, methods=methods, apparate_budgets=protocol.APPARATE_BUDGETS,
        threshold_grid=baselines.default_threshold_grid(traces),
        oracle_lambdas=baselines.default_oracle_lambdas(traces), max_bytes=protocol.DEFAULT_MAX_BYTES,
        oracle_target="agreement", fit_signal=fit_signal)
    for m, (fit_ev, _) in res.items():
      evals[m if signal == "1-conf" else f"{m} [{signal}]"] = fit_ev
  out = {}
  for m, ev in evals.items():
    out[m] = {}
    for t in TARGETS:
      i = select.choose_index(ev, t)
      out[m][t] = 1.0 if i is None else float(ev.speedup[i])
  k = traces.num_ramps
  grid = traces.num_inputs if k == 3 else int(max_combos ** (1.0 / max(k - 2, 1)))
  out["per-ramp thresholds (exhaustive)"] = ramp_threshold_ceiling(traces, TARGETS, grid)
  out["learned scores (exhaustive)"] = ramp_threshold_ceiling(learned_scores(traces, block),
                                                              TARGETS, grid)
  out["learned scores + class (exhaustive)"] = ramp_threshold_ceiling(
      learned_scores(traces, block, classes=True), TARGETS, grid)
  if traces.signal is not None:  # thresholds on the trace's signal instead of 1 - conf
    out["per-ramp thresholds [signal] (exhaustive)"] = ramp_threshold_ceiling(
        traces._replace(conf=1.0 - np.clip(traces.signal, 0.0, 1.0)), TARGETS, grid)
  return out


def methods_of(traces):
  """The report's rows for `traces`: METHODS, plus the trace signal's families."""
  if traces.signal is None:
    return METHODS
  return METHODS[:-2] + ("recall [signal]", "per-ramp thresholds [signal] (exhaustive)") + METHODS[-2:]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-combos", type=int, default=20000, dest="max_combos",
                      help="threshold combinations of the first K-2 ramps tried by the "
                           "exhaustive search (3 ramps: every distinct value)")
  parser.add_argument("--num-lambdas", type=int, default=600)
  parser.add_argument("--out", default=None, help="write the report (markdown) here")
  parser.add_argument("--trace-dir", default=None,
                      help="digits traces to read (default experiments/traces/pool2)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  lines = ["| workload | method | " + " | ".join(f"loss <= {t * 100:g}%" for t in TARGETS) + " |",
           "|---|---|" + "---:|" * len(TARGETS)]
  summary = []
  for name, traces in workloads.suite(args.trace_dir).items():
    t0 = time.perf_counter()
    block = 4 if name.startswith("digits") else 1
    res = in_sample(traces, args.num_lambdas, args.max_combos, block)
    methods = methods_of(traces)
    policies = [m for m in methods if m != "oracle"]
    for m in methods:
      lines.append(f"| {name} | {m} | " + " | ".join(f"{res[m][t]:.2f}x" for t in TARGETS) + " |")
    top = max(policies, key=lambda m: res[m][0.01])
    summary.append(f"{name}: best policy in-sample at <= 1% loss {res[top][0.01]:.2f}x ({top}); "
                   f"oracle {res['oracle'][0.01]:.2f}x")
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
  table = "\n".join(lines + [""] + summary)
  print(table)
  if args.out:
    cmd = "python experiments/ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = __doc__.split("\n\n", 1)[1].split("Usage:")[0].strip()
    findings = FINDINGS
    if args.trace_dir is not None:  # the intro's claim and FINDINGS are about experiments/traces/pool2
      intro = intro.split("\n\n", 1)[1]
      findings = workloads.findings_elsewhere(args.trace_dir, "CEILING.md")
    with open(args.out, "w") as f:
      f.write(f"# In-sample ceilings of each policy family (issue 7)\n\nCommand: `{cmd.strip()}` "
              f"({(time.perf_counter() - start) / 60:.1f} min on {platform.machine()} "
              f"{os.cpu_count()}-core CPU, jexit {jexit.__version__}).\n\n{intro}\n\n"
              f"Cells: speedup on all rows at the parameter with the most speedup whose agreement "
              f"loss on the same rows is within the target (1.00x: the backbone).\n\n"
              f"{findings}\n## Output\n\n{table}\n")
  return 0


if __name__ == "__main__":
  main()
