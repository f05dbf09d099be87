"""Certified budgets through the real chooser (issue 23, part 2): `jexit.choose` with
and without `delta`, its inner cross-fitted signal choice included.

experiments/certified.py measured the certification on precomputed family paths;
this script runs what `jexit budget` runs, uncertified (`delta=None`, the old
default: half the rows fit, the other half held out) and certified (`delta=0.1`,
the new default: the calibration share chosen by `auto_calibration_share`, the
test by `default_certify_test`), and measures the shipped table on rows neither
call saw:

- synthetic workloads: per draw, a fresh 4,000-row sample (the suite's size) goes
  to `choose`; the truth is 100,000 further rows of the generator (exact up to a
  binomial standard error of 0.03 points at 1%).
- digits traces (blocks of 4 augmented copies of one image): per draw, a seeded
  30% of the blocks is held out as the truth and the other 70% go to `choose`.
  That truth has about 860 rows: at 1% its loss estimate has a standard error of
  about 0.35 points (more with the copies' correlation), which inflates both
  overshoot shares alike; read the digits rows for speed, the synthetic ones for
  validity.

Overshoot: the shipped table's true loss above eps. Speedup: on the truth rows.

Usage:
  PYTHONPATH=. python experiments/certified_choose.py [--draws 12] [--eps 0.01 0.02]
      [--workloads synth-smooth ...] [--num-lambdas 300]
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jexit  # pylint: disable=wrong-import-position
from jexit import certify, select  # pylint: disable=wrong-import-position
from jexit.evaluation import evaluate  # pylint: disable=wrong-import-position
from jexit.traces import split_rows  # pylint: disable=wrong-import-position
from experiments import workloads  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
TRACE_DIR = os.path.join(HERE, "traces", "pool4_s1")
REPORT = os.path.join(HERE, "reports", "CERTIFIED.md")
MARK = "<!-- experiments/certified_choose.py: the section below is rewritten by it -->"
DELTA = 0.1
WORKLOADS = ("synth-smooth", "synth-overthink", "digits-vgg11-3r", "digits-vgg16-5r")


def shipped_outcome(table, truth):
  """`(true loss, true speedup)` of a shipped table (None: nothing met the budget on
  the fit rows, so nothing ships; counted as the backbone)."""
  if table is None:
    return 0.0, 1.0
  ev = evaluate(table.policy, truth, table.binning)
  return (1.0 - float(np.asarray(ev.agreement)[table.lam_index]),
          float(np.asarray(ev.speedup)[table.lam_index]))


def draw(name, suite, d):
  """One draw: `(rows to choose on, truth rows, block)`."""
  if name.startswith("synth"):
    kind = name.split("-")[1]
    return (workloads.synthetic(kind, n=4000, seed=50_000 + d),
            workloads.synthetic(kind, n=100_000, seed=77_000 + len(kind)), 1)
  traces = suite[name]
  keep, truth = split_rows(traces.num_inputs, test_fraction=0.3, seed=1000 + d, block=4)
  return traces.take(keep), traces.take(truth), 4


def run(args):
  suite = workloads.suite(TRACE_DIR)
  out, timing = {}, {}
  for name in args.workloads:
    start = time.perf_counter()
    for eps in args.eps:
      rows = []
      for d in range(args.draws):
        t, truth, block = draw(name, suite, d)
        kw = dict(seed=d, block=block, num_lambdas=args.num_lambdas, methods=select.DEPLOYABLE)
        plain = jexit.choose(t, eps, **kw)
        cert = jexit.choose(t, eps, delta=DELTA, **kw)
        c = cert.certificate
        rows.append({"plain": shipped_outcome(plain.table, truth),
                     "cert": shipped_outcome(cert.table, truth),
                     "certified": isinstance(c, certify.Certificate),
                     "shipped": cert.table.method, "plain_shipped": plain.best,
                     "units": c.units, "test": c.test,
                     "share": cert.split["calibration_share"]})
      out[(name, eps)] = rows
    timing[name] = time.perf_counter() - start
    print(f"{name}: {timing[name]:.0f} s", flush=True)
  return out, timing


def share_text(k, n):
  lo = 0.0 if k == 0 else 1 - float(certify.ucb(n - k, n, 0.025))
  hi = float(certify.ucb(k, n, 0.025))
  return f"{100 * k / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def report(out, timing, args, elapsed, command, started):
  lines = [MARK, "", "## The real chooser: `jexit.choose` with and without `delta` "
           "(experiments/certified_choose.py)", "",
           f"Command: `{command}`", "",
           f"Run {started} UTC, {elapsed / 60:.1f} min wall on a shared {os.cpu_count()}-core "
           f"{platform.machine()} CPU, jexit {jexit.__version__}, numpy {np.__version__}. "
           "Per workload: " + ", ".join(f"{n} {t / 60:.1f} min" for n, t in timing.items())
           + ".", "",
           __doc__.split("\n\n", 1)[1].split("Usage:")[0].strip(), "",
           f"{args.draws} draws per cell; {args.num_lambdas} lam values per candidate model; "
           f"delta = {DELTA:g}; methods: {', '.join(select.DEPLOYABLE)} (the shipped table: "
           "the best of them on the fit rows, certified when delta is given; the backbone "
           "when nothing certifies). 95% Clopper-Pearson intervals in brackets.", "",
           "| workload | eps | uncertified: overshoot | uncertified: speedup (mean loss) "
           "| certified: overshoot | certified: speedup (mean loss) | kept | nothing certified "
           "| calibration units (test) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  pooled = {}
  for (name, eps), rows in out.items():
    plain = np.array([r["plain"] for r in rows])
    cert = np.array([r["cert"] for r in rows])
    n = len(rows)
    kp, kc = int(np.sum(plain[:, 0] > eps + 1e-12)), int(np.sum(cert[:, 0] > eps + 1e-12))
    kind = "synthetic" if name.startswith("synth") else "digits"
    acc = pooled.setdefault(kind, [0, 0, 0, [], []])
    acc[0] += kp
    acc[1] += kc
    acc[2] += n
    acc[3].append(plain[:, 1].mean())
    acc[4].append(cert[:, 1].mean())
    lines.append(
        f"| {name} | {eps * 100:g}% | {share_text(kp, n)} | {plain[:, 1].mean():.2f}x "
        f"({100 * plain[:, 0].mean():.2f}%) | {share_text(kc, n)} | {cert[:, 1].mean():.2f}x "
        f"({100 * cert[:, 0].mean():.2f}%) | {cert[:, 1].mean() / plain[:, 1].mean():.0%} | "
        f"{sum(not r['certified'] for r in rows)} of {n} | {rows[0]['units']} "
        f"({rows[0]['test']}, share {rows[0]['share']:g}) |")
  lines += ["", "Pooled over the cells of each kind:", ""]
  for kind, (kp, kc, n, sp, sc) in pooled.items():
    lines.append(f"- **{kind}**: the uncertified default's table overshot eps in "
                 f"{share_text(kp, n)} of {n} draws, the certified one in {share_text(kc, n)}; "
                 f"the certified table keeps {np.mean(sc) / np.mean(sp):.0%} of the uncertified "
                 f"speedup ({np.mean(sc):.2f}x against {np.mean(sp):.2f}x, mean over cells).")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--draws", type=int, default=12)
  p.add_argument("--eps", type=float, nargs="*", default=[0.01, 0.02])
  p.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
  p.add_argument("--num-lambdas", type=int, default=300, dest="num_lambdas")
  p.add_argument("--out", default=REPORT,
                 help="the report whose section after the marker line is rewritten")
  args = p.parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  t0 = time.perf_counter()
  out, timing = run(args)
  command = "PYTHONPATH=. python experiments/certified_choose.py " + " ".join(
      argv if argv is not None else sys.argv[1:])
  text = report(out, timing, args, time.perf_counter() - t0, command.strip(), started)
  old = open(args.out, encoding="utf-8").read() if os.path.exists(args.out) else ""
  head = old.split(MARK)[0].rstrip("\n")
  with open(args.out, "w", encoding="utf-8") as f:
    f.write((head + "\n\n" if head else "") + text)
  print(text)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
