"""Workloads of the benchmark suites: real digits VGG traces and synthetic ones.

The digits traces are read from `TRACE_DIR` (experiments/traces/pool2, the first
suite, which the written findings of QUALITY.md, UNION.md and CEILING.md are
about) unless a folder is given; issue 7's benchmark suite is
experiments/traces/pool4_s1 (CONFIRM.md).

Synthetic traces follow a hidden per-input difficulty that evolves as an AR(1)
chain over the ramps; each ramp's confidence is a noisy view of it and its
prediction agrees with the final ramp with a probability that grows with the
confidence. Two flavours:
  - "smooth": confidence rises steadily with depth (deeper = more confident).
  - "overthink": confidence is non-monotone (a middle ramp is often less sure
    than an earlier one), the case where recall is expected to help.
"""

import os
from typing import Dict, Optional

import numpy as np

import jexit

HERE = os.path.dirname(os.path.abspath(__file__))
TRACE_DIR = os.path.join(HERE, "traces", "pool2")


def findings_elsewhere(trace_dir: str, report: str) -> str:
  """The Findings section of a report run on another folder of digits traces:
  `report`'s written findings are about `TRACE_DIR` and do not apply."""
  return (f"## Findings\n\nTraces: `{trace_dir}`. The written findings of "
          f"experiments/reports/{report} are about experiments/traces/pool2 and are not repeated here; "
          "the report that cites this command discusses these traces.\n")


def latent_confidence(rng, base, rho, noise, weight, n, classes):
  """`[n, len(base)]` confidences: a logistic view, floored at chance
  (1 / classes), of `base[r] - weight * difficulty + noise * state`, where the
  per-input difficulty is fixed and the state is an AR(1) chain over the ramps."""
  difficulty = rng.normal(size=n)
  state = rng.normal(size=n)
  z = np.empty((n, len(base)))
  for r in range(len(base)):
    state = rho * state + np.sqrt(1 - rho ** 2) * rng.normal(size=n)
    z[:, r] = base[r] - weight * difficulty + noise * state
  floor = 1.0 / classes
  return floor + (1 - floor) / (1 + np.exp(-z))


def synthetic(kind: str, n: int = 4000, k: int = 5, classes: int = 10,
              seed: int = 0) -> jexit.Traces:
  """A synthetic trace of `n` inputs and `k` ramps (see module docstring)."""
  rng = np.random.default_rng(seed)
  depth = np.linspace(0, 1, k)
  if kind == "smooth":
    base = 1.5 + 4.0 * depth          # mean logit confidence per ramp
    rho, noise = 0.85, 0.6
  elif kind == "overthink":
    base = 2.5 + 2.5 * depth - 2.0 * np.sin(np.pi * depth) ** 2
    rho, noise = 0.6, 1.0
  else:
    raise ValueError(f"kind: expected 'smooth' or 'overthink', got {kind!r}")
  conf = latent_confidence(rng, base, rho, noise, 2.0, n, classes)
  label = rng.integers(0, classes, n)
  # The final ramp is right with probability conf; other ramps agree with the
  # final one with probability conf (calibrated against agreement).
  final_right = rng.uniform(size=n) < conf[:, -1]
  final = np.where(final_right, label, (label + rng.integers(1, classes, n)) % classes)
  pred = np.empty((n, k), np.int64)
  pred[:, -1] = final
  for r in range(k - 1):
    agree = rng.uniform(size=n) < conf[:, r]
    pred[:, r] = np.where(agree, final, (final + rng.integers(1, classes, n)) % classes)
  cost = np.full(k, 1.0)
  return jexit.Traces(conf=conf, pred=pred, label=label, cost=cost)


def suite(trace_dir: Optional[str] = None,
          signal_as_conf: bool = False) -> Dict[str, jexit.Traces]:
  """Every workload of a benchmark suite that is available here.

  `trace_dir`: folder of the digits traces (default `TRACE_DIR`).
  `signal_as_conf`: digits traces that record a signal in [0, 1] (the
  margin: `make_traces.py --signal margin`) get `conf = 1 - signal` and no
  signal, so that every method, the threshold baselines included, reads it.
  """
  trace_dir = TRACE_DIR if trace_dir is None else trace_dir
  out = {}
  for arch in ("vgg11", "vgg13", "vgg16"):
    for ramps in (3, 5):
      path = os.path.join(trace_dir, f"digits_{arch}_{ramps}ramps.npz")
      if os.path.exists(path):
        traces = jexit.load_traces(path)
        if signal_as_conf:
          if traces.signal is None:
            raise ValueError(f"{path}: signal_as_conf needs traces with a signal")
          traces = jexit.check_traces(traces._replace(conf=1.0 - traces.signal, signal=None))
        out[f"digits-{arch}-{ramps}r"] = traces
  out["synth-smooth"] = synthetic("smooth", seed=1)
  out["synth-overthink"] = synthetic("overthink", seed=2)
  return out
