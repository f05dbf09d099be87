"""Decisions of the command line, saved before a refactor and compared after it.

  python experiments/snapshot.py save DIR      # before moving code
  python experiments/snapshot.py check DIR     # after: every decision identical?
  python experiments/snapshot.py check DIR --uncertified
      # budget and export --max-loss with --delta none: compare with a snapshot
      # saved before certification became the default

Runs `jexit budget`, `sweep`, `export` and `demo` on the embedded trace and on
every workload of the benchmark suite (experiments/traces/pool4_s1 and the two
synthetic ones), and keeps their JSON, their printed tables (timings removed)
and the exported policy files. `check` reruns them and lists every difference.
"""

import contextlib
import io
import json
import os
import re
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from experiments import workloads  # noqa: E402
import jexit  # noqa: E402
from jexit import cli  # noqa: E402

SUITE = os.path.join(HERE, "traces", "pool4_s1")
ROOT = os.path.dirname(HERE)
UNCERTIFIED = "--uncertified" in sys.argv


def _traces(tmp):
  """name -> (path, block) of every trace the snapshot runs on."""
  out = {"embedded": (jexit.demo_trace_path(), 4)}
  for name, traces in workloads.suite(SUITE).items():
    if name.startswith("synth"):
      path = os.path.join(tmp, f"{name}.npz")
      jexit.save_traces(path, traces)
      out[name] = (path, 1)
    else:
      arch, ramps = name.split("-")[1:]
      out[name] = (os.path.join(SUITE, f"digits_{arch}_{ramps[:-1]}ramps.npz"), 4)
  return out


def _commands(path, block, out, name):
  b = ["--block", str(block)]
  j = lambda tag: os.path.join(out, f"{name}.{tag}.json")
  p = lambda tag: os.path.join(out, f"{name}.{tag}.npz")
  cmds = {
      "budget": ["budget", path, "--max-loss", "0.01", "--json", j("budget")] + b,
      "budget_acc": ["budget", path, "--max-loss", "0.005", "--metric", "accuracy",
                     "--json", j("budget_acc")] + b,
      "budget_folds": ["budget", path, "--max-loss", "0.02", "--folds", "3",
                       "--num-lambdas", "200", "--json", j("budget_folds")] + b,
      "sweep": ["sweep", path, "--json", j("sweep"), "--all-points"] + b,
      "sweep_paper": ["sweep", path, "--paper", "--json", j("sweep_paper")] + b,
      "export_best": ["export", path, "--max-loss", "0.01", "--out", p("export_best")] + b,
      "export_solver": ["export", path, "--max-loss", "0.02", "--method", "solver",
                        "--no-recall", "--signal", "1-conf", "--out", p("export_solver")] + b,
      "export_lam": ["export", path, "--lam", "1e-8", "--out", p("export_lam")],
  }
  if UNCERTIFIED:
    for tag in ("budget", "budget_acc", "export_best", "export_solver"):
      cmds[tag] = cmds[tag] + ["--delta", "none"]
  return cmds


def _serving_commands(tmp, out):
  """place, export --place, monitor and refit, on the embedded trace's policy
  served with counters and audit on half its rows (seeded)."""
  cand = os.path.join(HERE, "traces", "place", "digits_vgg11_flops.npz")
  j = lambda tag: os.path.join(out, f"{tag}.json")
  policy = os.path.join(out, "embedded.export_best.npz")
  traces = jexit.load_traces(jexit.demo_trace_path())
  table = jexit.ExitTable.load(policy, counters=True, audit=0.05, seed=0)
  half = traces.conf.shape[0] // 2
  table.run(traces.conf[half:], traces.pred[half:])
  live = os.path.join(tmp, "live.npz")
  table.counters.save(live)
  return {
      "place": ["place", cand, "--max-loss", "0.01", "--block", "4",
                "--json", j("place"), "--out", os.path.join(out, "place.npz")],
      "export_place": ["export", cand, "--max-loss", "0.01", "--place", "--max-ramps", "4",
                       "--block", "4", "--out", os.path.join(out, "export_place.npz")],
      "monitor": ["monitor", policy, live, "--json", j("monitor")],
      "refit": ["refit", policy, live, "--trace", jexit.demo_trace_path(),
                "--out", os.path.join(out, "refit.npz")],
  }


def _run(argv):
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
    code = cli.main(argv)
  text = re.sub(r"done in [0-9.]+ s; outputs in \S+", "done", buf.getvalue())
  text = re.sub(r"solve call\(s\) \([0-9.]+ s\)", "solve call(s)", text)
  text = text.replace(ROOT, "ROOT")
  return code, text


def _policy(path):
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  header = json.loads(str(arrays.pop("header")))
  header.pop("jexit_version", None)
  return header, arrays


def snapshot(out):
  os.makedirs(out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    record = {}
    for name, (path, block) in _traces(tmp).items():
      for tag, argv in _commands(path, block, out, name).items():
        code, text = _run(argv)
        record[f"{name}.{tag}"] = {"code": code, "stdout": text}
        print(f"{name}.{tag}: exit {code}", flush=True)
    code, text = _run(["demo", "--out", os.path.join(out, "demo")])
    record["demo"] = {"code": code, "stdout": text}
    for tag, argv in _serving_commands(tmp, out).items():
      code, text = _run(argv)
      record[tag] = {"code": code, "stdout": text}
      print(f"{tag}: exit {code}", flush=True)
  with open(os.path.join(out, "stdout.json"), "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)


def _load_json(path, folder):
  with open(path) as f:
    text = f.read().replace(folder, "OUT").replace(ROOT, "ROOT")
  data = json.loads(re.sub(r"/tmp/tmp\w+", "TMP", text))
  if isinstance(data, dict):
    data.pop("timings_s", None)  # place's wall times
  return data


def _compare(a, b, where, diffs):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        diffs.append(f"{where}.{k}: only in {'before' if k in a else 'after'}")
      else:
        _compare(a[k], b[k], f"{where}.{k}", diffs)
  elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    if not (np.shape(a) == np.shape(b) and np.array_equal(a, b)):
      diffs.append(f"{where}: arrays differ")
  elif a != b:
    diffs.append(f"{where}: {str(a)[:200]!r} != {str(b)[:200]!r}")


def check(before):
  with tempfile.TemporaryDirectory() as after:
    snapshot(after)
    diffs = []
    names = sorted(set(os.listdir(before)) | set(os.listdir(after)))
    for fname in names:
      pa, pb = os.path.join(before, fname), os.path.join(after, fname)
      if os.path.isdir(pa) or os.path.isdir(pb):
        fname = os.path.join(fname, "frontier.json")
        pa, pb = os.path.join(before, fname), os.path.join(after, fname)
      if not (os.path.exists(pa) and os.path.exists(pb)):
        diffs.append(f"{fname}: only {'before' if os.path.exists(pa) else 'after'}")
      elif fname.endswith(".json"):
        _compare(_load_json(pa, before), _load_json(pb, after), fname, diffs)
      elif fname.endswith(".npz"):
        (ha, aa), (hb, ab) = _policy(pa), _policy(pb)
        _compare(ha, hb, fname + ":header", diffs)
        _compare(aa, ab, fname, diffs)
  print("\n".join(diffs) if diffs else f"identical: {len(names)} files")
  return 1 if diffs else 0


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a != "--uncertified"]
  if len(args) != 2 or args[0] not in ("save", "check"):
    sys.exit(__doc__)
  sys.exit(snapshot(args[1]) if args[0] == "save" else check(args[1]))
