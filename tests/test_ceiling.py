"""experiments/ceiling.py's exhaustive per-ramp threshold search is exhaustive.

Checked against every combination of per-ramp thresholds at the distinct
values of `1 - conf` (plus never and always), scored by
`jexit.baselines.threshold_rule`, on tiny traces with ties.
"""

import itertools

import numpy as np
import pytest

import jexit
from jexit import baselines


def _brute_force(traces, targets):
  u = 1 - traces.conf
  k = traces.num_ramps
  values = [np.r_[0.0, np.inf, np.unique(u[:, j])] for j in range(k - 1)]
  combos = np.array([c + (np.inf,) for c in itertools.product(*values)])
  ev = baselines.threshold_rule(traces, combos)
  return {t: float(ev.speedup[ev.agreement >= 1 - t - 1e-12].max()) for t in targets}


@pytest.mark.parametrize("k, seed", [(3, 0), (3, 1), (4, 2)])
def test_exhaustive_search_equals_brute_force(k, seed, load_script):
  rng = np.random.default_rng(seed)
  n = 14
  conf = np.round(rng.uniform(0.3, 1.0, (n, k)), 1)  # rounding makes ties
  pred = rng.integers(0, 3, (n, k))
  traces = jexit.Traces(conf, pred, None, rng.uniform(0.5, 2.0, k))
  targets = (0.0, 0.1, 0.25, 0.5, 1.0)  # 1.0: stop every input at ramp 1
  got = load_script("experiments/ceiling.py").ramp_threshold_ceiling(traces, targets, grid=n)
  want = _brute_force(traces, targets)
  assert got == pytest.approx(want)
  assert len(set(want.values())) > 1  # the targets constrain the rule differently


def test_a_coarse_grid_is_a_lower_bound(load_script):
  ceiling = load_script("experiments/ceiling.py")
  rng = np.random.default_rng(5)
  conf = rng.uniform(0.3, 1.0, (60, 4))
  traces = jexit.Traces(conf, rng.integers(0, 2, (60, 4)), None, np.ones(4))
  targets = (0.05, 0.2)
  fine = ceiling.ramp_threshold_ceiling(traces, targets, grid=60)
  coarse = ceiling.ramp_threshold_ceiling(traces, targets, grid=3)
  assert all(coarse[t] <= fine[t] + 1e-12 for t in targets)
  assert fine == pytest.approx(_brute_force(traces, targets))


def test_a_trace_signal_adds_its_families(load_script):
  ceiling = load_script("experiments/ceiling.py")
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.3, 1.0, (20, 3))
  plain = jexit.Traces(conf, rng.integers(0, 2, (20, 3)), None, np.ones(3))
  assert ceiling.methods_of(plain) == ceiling.METHODS
  rows = ceiling.methods_of(plain._replace(signal=1 - conf))
  assert set(rows) - set(ceiling.METHODS) == {"recall [signal]",
                                              "per-ramp thresholds [signal] (exhaustive)"}
  assert rows[-2:] == ("patience", "oracle")
